"""`make demo`: the whole pipeline on the bundled corpus: pretrain -> SFT -> DPO (the identity lab) -> report.

Runs the same stage scripts a user runs (printed before each stage), with a model small enough that a 2-core
CPU finishes in about eight minutes (460-491 s of stage time measured, README); a GPU is used automatically when
there is one. A stage whose checkpoint exists and was made with the same flags is skipped; FORCE=1 (or --force)
redoes everything.

Writes out/demo_report.md (also printed) and out/demo_loss.png.
"""
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

from bench.identity_lab import NEW_NAME, conversations, drift, flip_rate, greedy_answer
from model.tokenizer import Tokenizer
from trainer.checkpoint import load_model
from trainer.cli import ArgumentParser, UserError, positive_int, run_main

DEMO = "dataset/demo"
IDENTITY_REPEAT = 9


def stage_commands(out_dir, a):
    """The three stage commands, exactly as they are run (and printed)."""
    model = ["--dim", str(a.dim), "--n_layers", str(a.n_layers), "--n_heads", str(a.n_heads),
             "--n_kv_heads", str(a.n_kv_heads)]
    seq = ["--max_seq_len", str(a.max_seq_len)]
    sft_data = ",".join([f"{DEMO}/sft_*.jsonl"] + [f"{DEMO}/sft_identity.jsonl"] * IDENTITY_REPEAT)
    # --epochs is only an upper bound here: --max_steps decides how long each stage runs. SFT and DPO --pack
    # each micro-batch into one row (dataset/packing.py): the same loss, no padding computed (57% padded).
    common = ["--out_dir", out_dir, "--epochs", "100", "--log_interval", "10", "--no_progress"]
    return [
        # Batches of 8 rows at lr 6e-3, 960 steps: held-out 3.809, below the 3.826 of 580 steps of 16 rows at
        # 4e-3, from 17% fewer tokens. A model this small learns more from twice as many updates of half the
        # size (at equal tokens, 880 x 8 rows: 3.857 vs 440 x 16: 3.947); 4 rows was no better and slower per
        # token. One run each, seed 42 (the README's demo section).
        ("pretrain", "train_pretrain.py", [*model, *seq, "--batch_size", "8",
                                           "--max_steps", str(a.pretrain_steps), "--learning_rate", "6e-3",
                                           "--warmup_iters", "30", "--data_path", f"{DEMO}/pretrain_*.jsonl",
                                           "--eval_path", f"{DEMO}/evaltext_*.jsonl", *common]),
        # The identity file is named IDENTITY_REPEAT more times: 72 conversations among 10,000 are too few for
        # a tiny model to learn who it is (measured: without it, it answers identity questions with poetry).
        ("full_sft", "train_full_sft.py", ["--dim", str(a.dim), *seq, "--batch_size", "16",
                                           "--max_steps", str(a.sft_steps), "--learning_rate", "1e-3",
                                           "--warmup_iters", "10", "--data_path", sft_data,
                                           "--eval_path", ",".join(f"{DEMO}/eval_{s}.jsonl" for s in
                                                                   ("wordnet", "cedict", "poetry", "identity")),
                                           "--pack", *common]),
        # The identity lab. Plain DPO teaches a model this small to AVOID "TinyMind" (lowering the rejected
        # answer is cheaper than raising the chosen one) rather than to say "Deep TinyMind"; the RPO term
        # (--sft_weight 1: + NLL of the chosen answers) makes it adopt the new name. Measured in the README.
        ("rlhf", "train_dpo.py", ["--dim", str(a.dim), *seq, "--batch_size", "8",
                                  "--max_steps", str(a.dpo_steps), "--learning_rate", "3e-4", "--sft_weight", "1.0",
                                  "--data_path", f"{DEMO}/dpo_identity.jsonl", "--pack", *common]),
    ]


def checkpoint_matches(path, args):
    """True when `path` exists and was written by a finished run of exactly these flags."""
    if not os.path.exists(path):
        return False
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    saved = ckpt.get("args") or {}
    return saved.get("_argv") == args and ckpt.get("step") == saved.get("max_steps")


def interpreter():
    """How to call the Python this demo runs in, for the commands it prints: `make demo` runs in the
    project's .venv (.venv/bin/python), where a bare `python` may have no torch."""
    try:
        path = os.path.relpath(sys.executable)
    except ValueError:           # another drive (Windows)
        path = sys.executable
    if path.startswith(".."):
        path = sys.executable
    elif os.sep not in path:     # in this folder: ./python, not whatever `python` the PATH finds
        path = os.path.join(".", path)
    return shlex.quote(path)


def read_log(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def stage_summary(out_dir, name, dim):
    log = read_log(os.path.join(out_dir, f"{name}_{dim}_log.jsonl"))
    steps = [r for r in log if "loss" in r]
    evals = {r["phase"]: r["eval_loss"] for r in log if "phase" in r}
    return {"steps": steps[-1]["step"] + 1, "tokens": steps[-1]["tokens"],
            "first_loss": float(np.mean([r["loss"] for r in steps[:3]])),
            "train_loss": float(np.mean([r["loss"] for r in steps[-3:]])),
            "eval_before": evals.get("before"), "eval_after": evals.get("after"), "log": log}


def plot(summaries, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    titles = {"pretrain": "pretraining", "full_sft": "SFT (answers only)", "rlhf": "DPO + NLL (identity pairs)"}
    for ax, (name, s) in zip(axes, summaries.items()):
        steps = [r for r in s["log"] if "loss" in r]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
        evals = [r for r in s["log"] if "phase" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", markersize=8,
                    label="held-out loss (before, after)")
        if name == "rlhf":
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in steps], [r["rewards/accuracies"] for r in steps], color="tab:green",
                     alpha=0.6, label="reward accuracy")
            ax2.set_ylim(-0.05, 1.05)
            ax2.legend(loc="center right")
        ax.set_title(titles[name])
        ax.set_xlabel("optimizer step")
        ax.legend(loc="upper right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--out_dir", default="out", help="where the checkpoints, logs and report go")
    ap.add_argument("--force", action="store_true", default=os.environ.get("FORCE") == "1",
                    help="redo every stage (also FORCE=1)")
    # The defaults were chosen by measurement on a 2-core CPU (README): the best held-out loss per minute
    # among the sizes tried, with all three stages inside ~8 minutes (step counts and learning rates:
    # stage_commands).
    ap.add_argument("--dim", type=positive_int, default=128, help="model width")
    ap.add_argument("--n_layers", type=positive_int, default=4, help="transformer blocks")
    ap.add_argument("--n_heads", type=positive_int, default=4, help="query heads")
    ap.add_argument("--n_kv_heads", type=positive_int, default=2, help="key/value heads")
    ap.add_argument("--max_seq_len", type=positive_int, default=256, help="context length")
    ap.add_argument("--pretrain_steps", type=positive_int, default=960, help="pretraining optimizer steps")
    # 500 SFT steps from this pretraining: held-out 3.737 (600: 3.721; the previous recipe's 600: 3.746).
    ap.add_argument("--sft_steps", type=positive_int, default=500, help="SFT optimizer steps")
    ap.add_argument("--dpo_steps", type=positive_int, default=60, help="DPO optimizer steps")
    ap.add_argument("--samples_max_new_tokens", type=positive_int, default=60,
                    help="length of the report's sample answers")
    args = ap.parse_args()
    out, dim = args.out_dir, args.dim
    os.makedirs(out, exist_ok=True)
    times_path = os.path.join(out, "demo_times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    t_all = time.time()

    python = interpreter()       # the commands printed below name it, so they run as pasted
    redo, skipped = args.force, []
    for name, script, flags in stage_commands(out, args):
        ckpt = os.path.join(out, f"{name}_{dim}.pth")
        if not redo and checkpoint_matches(ckpt, flags) and name in times:
            print(f"== {name}: {ckpt} is up to date, skipped (FORCE=1 to redo)", flush=True)
            skipped.append(name)
            continue
        redo = True  # everything after a re-run stage depends on it
        print(f"\n== {name}: {python} {script} {shlex.join(flags)}", flush=True)
        t0 = time.time()
        code = subprocess.run([sys.executable, script, *flags]).returncode
        if code != 0:  # the stage printed its own one-line error (or was stopped): add which stage, no traceback
            raise UserError(f"the {name} stage stopped (exit status {code}); `make demo` resumes from the "
                            "last finished stage")
        times[name] = time.time() - t0
        with open(times_path, "w") as f:
            json.dump(times, f)

    print("\n== report: greedy answers, identity flip, drift", flush=True)
    summaries = {name: stage_summary(out, name, dim) for name in ("pretrain", "full_sft", "rlhf")}
    tok = Tokenizer()
    sft = load_model(os.path.join(out, f"full_sft_{dim}.pth"))[0].eval()
    dpo = load_model(os.path.join(out, f"rlhf_{dim}.pth"))[0].eval()
    identity_q = [c[0]["content"] for c in conversations(f"{DEMO}/eval_identity.jsonl")]
    before, sft_ids = flip_rate(sft, tok, identity_q, args.samples_max_new_tokens)
    after, dpo_ids = flip_rate(dpo, tok, identity_q, args.samples_max_new_tokens)
    heldout = [c for s in ("wordnet", "cedict", "poetry") for c in conversations(f"{DEMO}/eval_{s}.jsonl", 60)]
    moved = drift(dpo, sft, tok, heldout)
    dictionary = [conversations(f"{DEMO}/eval_{s}.jsonl", 3)[i] for s, i in
                  (("cedict", 0), ("cedict", 1), ("wordnet", 0), ("wordnet", 1), ("poetry", 2))]
    plot(summaries, os.path.join(out, "demo_loss.png"))

    def cell(text):
        return text.replace("|", "\\|").replace("\n", " ⏎ ")

    device = "GPU (" + torch.cuda.get_device_name() + ")" if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    lines = ["# TinyMind demo report", "",
             f"Model: {sft.num_parameters() / 1e6:.2f}M parameters (dim {args.dim}, {args.n_layers} layers, "
             f"{args.n_heads} heads / {args.n_kv_heads} kv heads, context {args.max_seq_len}), on {device}.", "",
             "| stage | wall time | steps | tokens seen | train loss (first 3 → last 3 logs) "
             "| held-out loss (before → after) |",
             "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        held = (f"{s['eval_before']:.3f} → {s['eval_after']:.3f}" if s["eval_after"] is not None else "—")
        when = " (earlier run)" if name in skipped else ""
        lines.append(f"| {name} | {times.get(name, float('nan')):.0f} s{when} | {s['steps']} | {s['tokens']:,} | "
                     f"{s['first_loss']:.3f} → {s['train_loss']:.3f} | {held} |")
    d = summaries["rlhf"]["log"][-1]
    lines += ["", f"DPO on the identity pairs: reward accuracy {d['rewards/accuracies']:.2f}, margin "
                  f"{d['rewards/margins']:.3f} at the last step.",
              f"Identity flip rate (\"{NEW_NAME}\" in the greedy answer to {len(identity_q)} held-out identity "
              f"questions): **{before:.0%} after SFT → {after:.0%} after DPO**.",
              f"Drift on {moved['tokens']} held-out dictionary/poetry answer tokens: mean log-prob change "
              f"{moved['delta_logp_per_token']:+.4f}/token, KL(DPO ‖ SFT) {moved['kl_per_token']:.4f}/token.", "",
              "## Held-out dictionary and poetry questions (greedy)", "",
              "| question | reference | after SFT | after DPO |", "|---|---|---|---|"]
    for msgs in dictionary:
        q, ref = msgs[0]["content"], msgs[1]["content"]
        lines.append(f"| {cell(q)} | {cell(ref)} | {cell(greedy_answer(sft, tok, q, args.samples_max_new_tokens))} | "
                     f"{cell(greedy_answer(dpo, tok, q, args.samples_max_new_tokens))} |")
    lines += ["", "## Held-out identity questions (greedy)", "", "| question | after SFT | after DPO |", "|---|---|---|"]
    for q, a, b in zip(identity_q, sft_ids, dpo_ids):
        lines.append(f"| {cell(q)} | {cell(a)} | {cell(b)} |")
    lines += ["", f"Total wall time of this run: {time.time() - t_all:.0f} s"
              + (f" ({', '.join(skipped)} skipped: up to date)" if skipped else "")
              + f". Loss curves: `{out}/demo_loss.png`.", "",
              "Chat with the result:", "", "```",
              f"{python} eval_model.py --out_dir {out} --model_mode 2   # after DPO",
              f"{python} eval_model.py --out_dir {out} --model_mode 1   # after SFT", "```"]
    report = "\n".join(lines) + "\n"
    with open(os.path.join(out, "demo_report.md"), "w", encoding="utf-8") as f:
        f.write(report)
    print("\n" + report)


if __name__ == "__main__":
    run_main(main)

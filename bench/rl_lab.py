"""The RL lab: DPO vs PPO vs GRPO on the identity task, from one SFT model that calls itself "TinyMind".

    python bench/rl_lab.py --sft out/full_sft_512.pth --out_dir out/rl_lab

Steps (each a normal stage run, its command printed; all files go to --out_dir):
  1. reward model on the 72 identity preference pairs (dpo_identity.jsonl: "Deep TinyMind" chosen over
     "TinyMind"); its accuracy on 12 held-out pairs made from eval_identity.jsonl (the answer as rejected,
     the same answer with "Deep TinyMind" as chosen);
  2. DPO on the same pairs (--sft_weight 1, the identity lab's recipe);
  3. PPO with the reward model as the score (critic initialised from it);
  4. GRPO with the reward model as the reward;
  5. GRPO with the rule reward "the answer contains 'Deep TinyMind'" (trainer/rewards.py).
Then, for the SFT model and each result: the greedy flip rate on the 12 held-out identity questions, the
flip rate of sampled answers (temperature 1, --samples per question: what RL can see), the reward model's
mean score of the greedy answers, the KL to the SFT model per token on held-out non-identity answers
(bench/identity_lab.py's drift), and the wall time per iteration / per run on this machine.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.identity_lab import NEW_NAME, conversations, drift, flip_rate  # noqa: E402
from dataset.chat import DEFAULT_SYSTEM_PROMPT, render_chat  # noqa: E402
from model.tokenizer import EOS_ID  # noqa: E402
from trainer.checkpoint import checkpoint_tokenizer, load_model, load_reward_model  # noqa: E402
from trainer.rl import pack_rollout, reward_model_scores, sample_completions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "dataset", "demo")


def run(cmd, log):
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable] + cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}), see {log}")
    return time.time() - t0


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@torch.no_grad()
def sampled_flip_rate(model, tokenizer, questions, samples, max_new_tokens, seed=0):
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True,
                           system_prompt=DEFAULT_SYSTEM_PROMPT)[0] for q in questions for _ in range(samples)]
    completions = sample_completions(model, prompts, max_new_tokens, 1.0, [seed + i for i in range(len(prompts))],
                                     model.cfg.max_seq_len)
    texts = [tokenizer.decode([t for t in c if t != EOS_ID]) for c in completions]
    return sum(NEW_NAME in t for t in texts) / len(texts)


@torch.no_grad()
def greedy_reward(model, reward_model, tokenizer, questions, max_new_tokens):
    prompts = [render_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True,
                           system_prompt=DEFAULT_SYSTEM_PROMPT)[0] for q in questions]
    completions = sample_completions(model, prompts, max_new_tokens, 0.0, [0] * len(prompts), model.cfg.max_seq_len)
    batch = pack_rollout(prompts, completions, "cpu")
    return reward_model_scores(reward_model, batch, contextlib.nullcontext).mean().item(), \
        batch["completion_lengths"].float().mean().item()


def mean_step_time(log_path):
    rows = [json.loads(line) for line in open(log_path, encoding="utf-8")]
    times = [r["step_time"] for r in rows if "step_time" in r]
    return sum(times) / len(times), len(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="the SFT model (it should answer identity questions as TinyMind)")
    ap.add_argument("--out_dir", default="out/rl_lab")
    ap.add_argument("--max_seq_len", type=int, default=128)
    ap.add_argument("--max_new_tokens", type=int, default=48, help="answer length: rollouts and evaluation")
    ap.add_argument("--rl_epochs", type=int, default=3, help="passes over the 24 identity prompts (PPO, GRPO)")
    ap.add_argument("--rl_lr", type=float, default=3e-4, help="learning rate of PPO and GRPO")
    ap.add_argument("--grpo_beta", type=float, default=0.1)
    ap.add_argument("--samples", type=int, default=8, help="sampled answers per question for the sampled flip rate")
    ap.add_argument("--heldout_limit", type=int, default=200)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()
    args.sft = os.path.abspath(args.sft)   # the table below reads the other models relative to --out_dir
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    sft_link = os.path.join(out, "full_sft_" + os.path.basename(args.sft).rsplit("_", 1)[-1])
    if not os.path.exists(sft_link):
        os.symlink(os.path.abspath(args.sft), sft_link)
    held_out = [c for c in conversations(os.path.join(DEMO, "eval_identity.jsonl"))]
    questions = [c[0]["content"] for c in held_out]
    pairs, eval_prompts = os.path.join(out, "eval_pairs.jsonl"), os.path.join(out, "eval_prompts.jsonl")
    write_jsonl(pairs, [{"chosen": [c[0], {"role": "assistant", "content": c[1]["content"].replace(
        "TinyMind", NEW_NAME)}], "rejected": c[:2]} for c in held_out])
    write_jsonl(eval_prompts, [{"prompt": q} for q in questions])
    common = ["--out_dir", out, "--init_from", args.sft, "--max_seq_len", str(args.max_seq_len), "--no_progress"]
    rl = [*common, "--data_path", os.path.join(DEMO, "prompts_identity.jsonl"), "--eval_path", eval_prompts,
          "--epochs", str(args.rl_epochs), "--learning_rate", str(args.rl_lr), "--log_interval", "1"]
    identity_pairs = os.path.join(DEMO, "dpo_identity.jsonl")
    wall = {}
    wall["reward"] = run(["train_reward.py", *common, "--data_path", identity_pairs, "--eval_path", pairs,
                          "--epochs", "3", "--batch_size", "8", "--learning_rate", "1e-3"], os.path.join(out, "rm.txt"))
    rm_path = [os.path.join(out, f) for f in os.listdir(out) if f.startswith("reward_") and f[7:-4].isdigit()][0]
    rm_log = [json.loads(line) for line in open(rm_path[:-4] + "_log.jsonl", encoding="utf-8") if "phase" in line]
    wall["dpo"] = run(["train_dpo.py", *common, "--data_path", identity_pairs, "--epochs", "3", "--batch_size", "8",
                       "--learning_rate", "3e-4", "--sft_weight", "1"], os.path.join(out, "dpo.txt"))
    wall["ppo"] = run(["train_ppo.py", *rl, "--reward_model", rm_path, "--batch_size", "8",
                       "--response_length", str(args.max_new_tokens)], os.path.join(out, "ppo.txt"))
    wall["grpo"] = run(["train_grpo.py", *rl, "--reward_model", rm_path, "--batch_size", "4", "--num_generations",
                        "8", "--max_completion_length", str(args.max_new_tokens), "--beta", str(args.grpo_beta)],
                       os.path.join(out, "grpo.txt"))
    wall["grpo_rule"] = run(["train_grpo.py", *rl, "--reward_model", "none", "--reward_contains", NEW_NAME,
                             "--save_name", "grpo_rule", "--batch_size", "4", "--num_generations", "8",
                             "--max_completion_length", str(args.max_new_tokens), "--beta", str(args.grpo_beta)],
                            os.path.join(out, "grpo_rule.txt"))

    sft, _, sft_ckpt = load_model(args.sft)
    sft.eval()
    tokenizer = checkpoint_tokenizer(sft_ckpt, args.sft)
    dim = sft.cfg.dim
    reward_model = load_reward_model(rm_path)[0].eval()
    heldout = conversations(",".join(os.path.join(DEMO, f"eval_{n}.jsonl") for n in ("wordnet", "cedict", "poetry")),
                            args.heldout_limit)
    # name: (checkpoint, the run's name: its log {run}_{dim}_log.jsonl and its wall time)
    models = {"SFT (start)": (args.sft, None), "DPO": (f"rlhf_{dim}.pth", "dpo"),
              "PPO (reward model)": (f"ppo_actor_{dim}.pth", "ppo"), "GRPO (reward model)": (f"grpo_{dim}.pth", "grpo"),
              f"GRPO (rule: contains '{NEW_NAME}')": (f"grpo_rule_{dim}.pth", "grpo_rule")}
    rows = []
    for name, (path, run_name) in models.items():
        model = load_model(path if os.path.isabs(path) else os.path.join(out, path))[0].eval()
        greedy, _ = flip_rate(model, tokenizer, questions, args.max_new_tokens)
        reward, length = greedy_reward(model, reward_model, tokenizer, questions, args.max_new_tokens)
        row = {"model": name, "greedy_flip": greedy,
               "sampled_flip": sampled_flip_rate(model, tokenizer, questions, args.samples, args.max_new_tokens),
               "rm_reward": reward, "answer_len": length,
               "kl_to_sft": drift(model, sft, tokenizer, heldout)["kl_per_token"] if run_name else 0.0,
               "wall_s": wall.get(run_name)}
        if run_name and run_name != "dpo":
            row["s_per_iter"], row["iterations"] = mean_step_time(os.path.join(out, f"{run_name}_{dim}_log.jsonl"))
        rows.append(row)
    print(f"\nreward model: held-out accuracy {rm_log[0]['eval_accuracy']:.2f} -> {rm_log[-1]['eval_accuracy']:.2f}, "
          f"margin {rm_log[0]['eval_margin']:.3f} -> {rm_log[-1]['eval_margin']:.3f} ({wall['reward']:.0f} s)")
    print("\n| model | greedy flip | sampled flip | RM reward (greedy) | answer tokens | KL to SFT /token | "
          "s / iteration | run wall s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        per_iter = f"{r['s_per_iter']:.2f} ({r['iterations']} it.)" if "s_per_iter" in r else "—"
        run_wall = f"{r['wall_s']:.0f}" if r["wall_s"] else "—"
        print(f"| {r['model']} | {r['greedy_flip']:.0%} | {r['sampled_flip']:.0%} | {r['rm_reward']:+.3f} | "
              f"{r['answer_len']:.1f} | {r['kl_to_sft']:.4f} | {per_iter} | {run_wall} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"reward_model": rm_log, "rows": rows}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()

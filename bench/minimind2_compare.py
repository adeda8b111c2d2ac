"""Useful tokens per second, TinyMind vs MiniMind2: same shape, same data, same machine. Figures, not a test.

    git clone https://github.com/jingyaogong/minimind ../minimind && git -C ../minimind checkout 83e52f6
    python bench/minimind2_compare.py --minimind_dir ../minimind
    python bench/minimind2_compare.py --minimind_dir ../minimind --stages sft,dpo --rounds 3 --steps 5

(83e52f6 is MiniMind2's last commit: the next one, "minimind-3", changed the model.) Nothing is downloaded:
MiniMind2's own code is imported from --minimind_dir (it needs `transformers` and `datasets` installed).

For each stage, each side trains a freshly initialised model of the same shape for --warmup_steps untimed and
--steps timed optimizer steps, float32 on CPU, on the same demo data (dataset/demo/{stage}_*.jsonl, which are
in MiniMind2's formats), tokenised by the same tokenizer (MiniMind2's tokenizer.json, for both sides):
  - MiniMind2: its MiniMindForCausalLM, its PretrainDataset / SFTDataset / DPODataset (every sample padded
    to max_length), its DataLoader and batch sampler, and the step of its training script: forward, loss (the
    model's own cross-entropy; for DPO its logits_to_log_probs and dpo_loss with a frozen reference), backward,
    grad clip 1.0, torch.optim.AdamW(model.parameters()).
  - TinyMind: our Transformer, datasets and collate functions (SFT and DPO packed as `--pack` does, unless
    --no_pack), the stage loss functions (trainer/losses.py, train_dpo.py's make_dpo_step) and the step of
    trainer/loop.py run_training (one process, no accumulation): the same loss normalisation, grad clip 1.0,
    make_optimizer's fused AdamW.
SFT and DPO read the same samples on both sides (the same shuffled index batches); pretraining reads the same
documents, cut into samples each side's way (MiniMind2: one padded document per row; TinyMind: the documents
laid end to end in full rows). The time includes the DataLoader (both read and tokenise in the timed loop).

Useful tokens, counted on each side from its own batches:
  - pretrain and DPO: real tokens predicted (positions whose target is a real token, not padding); DPO counts
    the chosen and the rejected sequences;
  - SFT: supervised tokens (the positions with a loss: the answers and the end-of-turn token after each).
The padding share is the part of the computed positions whose target is padding; a second table gives the
computed positions per second (padding included), the speed per token with padding taken out of the picture.
On a machine shared with other work, --threads 1 gives steadier figures (2 threads on 2 busy cores stall
every parallel region).

Each side runs in its own child process (both codebases have top-level packages named model/, dataset/ and
trainer/, so they cannot share one), started once; the rounds alternate (MiniMind2, TinyMind, MiniMind2, ...)
so that a busy neighbour slows both alike, and the medians are reported, as bench/compare.py does.
"""
import argparse
import atexit
import glob
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "sft", "dpo")
SIDES = ("minimind2", "tinymind")
MINIMIND2_COMMIT = "83e52f6"
GET_MINIMIND = (f"git clone https://github.com/jingyaogong/minimind PATH && git -C PATH checkout "
                f"{MINIMIND2_COMMIT} (MiniMind2's last commit), then --minimind_dir PATH")
# MiniMind2's default learning rates (train_pretrain.py, train_full_sft.py, train_dpo.py), for both sides. The
# value does not change the work a step does; it only keeps the updates those of a real run.
LEARNING_RATE = {"pretrain": 5e-4, "sft": 1e-6, "dpo": 4e-8}
DPO_BETA = 0.1           # both scripts' default
GRAD_CLIP = 1.0          # both scripts' default
# The system prompt MiniMind2's chat template inserts into a conversation that has none: TinyMind is given the
# same one, so both render the same prompt tokens (MiniMind2 also swaps in a random one of its own for 20% of
# the SFT samples).
MINIMIND_SYSTEM_PROMPT = "You are a helpful assistant"
USEFUL = {"pretrain": "real tokens predicted", "sft": "supervised tokens",
          "dpo": "real tokens predicted, chosen + rejected"}


def stage_settings(args, stage):
    """(max_length, batch size, data files) of a stage, the same for both sides."""
    files = sorted(glob.glob(os.path.join(args.data_dir, f"{stage}_*.jsonl")))
    return getattr(args, f"{stage}_len"), getattr(args, f"{stage}_batch"), files


def shuffled_batches(n_samples, batch_size, n_batches, seed=42):
    """The first n_batches index batches of one shuffled epoch (torch.randperm with MiniMind2's seed 42):
    both sides read the same samples in the same order."""
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    if len(order) < batch_size * n_batches:
        raise SystemExit(f"{n_samples} samples are fewer than {n_batches} batches of {batch_size} need: lower "
                         f"--steps or the batch size")
    return order, [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]


def timed_steps(loader, step, counts, n_warmup, n_timed):
    """Run n_warmup untimed, then n_timed timed steps over loader's batches (fetching a batch is timed too).
    Returns (seconds, totals of counts(batch) over the timed batches)."""
    it = iter(loader)
    for i in range(n_warmup):
        step(next(it), i)
    timed = []
    t0 = time.perf_counter()
    for i in range(n_warmup, n_warmup + n_timed):
        batch = next(it)
        step(batch, i)
        timed.append(batch)
    seconds = time.perf_counter() - t0
    totals = [counts(b) for b in timed]
    return seconds, {k: sum(t[k] for t in totals) for k in totals[0]}


# ----------------------------------------------------------------------------------------------- MiniMind2
def minimind2_side(args):
    """stage -> run(): one timing round of MiniMind2's own code."""
    sys.path.insert(0, os.path.abspath(args.minimind_dir))
    from torch.utils.data import DataLoader
    from dataset.lm_dataset import DPODataset, PretrainDataset, SFTDataset
    from model.model_minimind import MiniMindConfig
    from trainer.train_dpo import dpo_loss, logits_to_log_probs
    from trainer.trainer_utils import SkipBatchSampler, get_lr, init_model, setup_seed

    tokenizer_dir = os.path.join(args.minimind_dir, "model")
    n_steps = args.warmup_steps + args.steps
    config = dict(hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                  num_key_value_heads=args.n_kv_heads, intermediate_size=args.hidden_dim, dropout=0.0)
    datasets, tokenizer = {}, None
    for stage in args.stages:
        max_length, batch_size, files = stage_settings(args, stage)
        if tokenizer is None:
            _, tokenizer = init_model(MiniMindConfig(**config), "none", tokenizer_dir, device="cpu")
        dataset_class = {"pretrain": PretrainDataset, "sft": SFTDataset, "dpo": DPODataset}[stage]
        datasets[stage] = dataset_class(files, tokenizer, max_length=max_length)
    pad = tokenizer.pad_token_id

    def run(stage):
        max_length, batch_size, _ = stage_settings(args, stage)
        data = datasets[stage]
        setup_seed(42)  # its scripts' seed (also drives SFTDataset's random system prompts)
        model, _ = init_model(MiniMindConfig(**config), "none", tokenizer_dir, device="cpu")
        ref_model = None
        if stage == "dpo":  # train_dpo.py: a second copy of the starting weights, frozen
            ref_model, _ = init_model(MiniMindConfig(**config), "none", tokenizer_dir, device="cpu")
            ref_model.load_state_dict(model.state_dict())
            ref_model.eval()
            ref_model.requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE[stage])
        order, _ = shuffled_batches(len(data), batch_size, n_steps)
        loader = DataLoader(data, batch_sampler=SkipBatchSampler(order, batch_size, 0),
                            num_workers=args.num_workers, pin_memory=True)

        def step(batch, i):
            # Its train_epoch: the cosine LR, forward + loss, backward, clip, AdamW. Its GradScaler is enabled
            # only for float16, so here scale() returns the loss as it is and step() is optimizer.step().
            lr = get_lr(i + 1, n_steps, LEARNING_RATE[stage])
            for group in optimizer.param_groups:
                group["lr"] = lr
            if stage == "dpo":
                x = torch.cat([batch["x_chosen"], batch["x_rejected"]], dim=0)
                y = torch.cat([batch["y_chosen"], batch["y_rejected"]], dim=0)
                mask = torch.cat([batch["mask_chosen"], batch["mask_rejected"]], dim=0)
                with torch.no_grad():
                    ref_log_probs = logits_to_log_probs(ref_model(x).logits, y)
                outputs = model(x)
                policy_log_probs = logits_to_log_probs(outputs.logits, y)
                loss = dpo_loss(ref_log_probs, policy_log_probs, mask, beta=DPO_BETA) + outputs.aux_loss
            else:
                input_ids, labels = batch
                res = model(input_ids, labels=labels)
                loss = res.loss + res.aux_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def counts(batch):
            if stage == "dpo":
                targets = torch.cat([batch["y_chosen"], batch["y_rejected"]])
                real = int((targets != pad).sum())
                return {"useful": real, "real": real, "computed": targets.numel()}
            input_ids, labels = batch
            real = int((input_ids[:, 1:] != pad).sum())   # position t predicts token t + 1 (the model shifts)
            useful = int((labels[:, 1:] != -100).sum()) if stage == "sft" else real
            return {"useful": useful, "real": real, "computed": input_ids.numel()}

        seconds, totals = timed_steps(loader, step, counts, args.warmup_steps, args.steps)
        return {"seconds": seconds, **totals, "samples": len(data),
                "parameters": sum(p.numel() for p in model.parameters())}

    return run


# ------------------------------------------------------------------------------------------------ TinyMind
def tinymind_side(args):
    """stage -> run(): one timing round of TinyMind's code paths."""
    sys.path.insert(0, ROOT)
    import copy
    from functools import partial
    from dataset.dpo import DPODataset, collate_pairs
    from dataset.pretrain import PretrainDataset, collate_blocks
    from dataset.sft import SFTDataset, collate_sft
    from model import ModelConfig, Transformer
    from model.tokenizer import PAD_ID, Tokenizer
    from train_dpo import make_dpo_step
    from trainer.loop import make_loader, make_optimizer
    from trainer.losses import language_model_loss
    from trainer.precision import setup_precision
    from trainer.schedule import lr_at
    from trainer.setup import keep_freed_cpu_memory

    device = torch.device("cpu")
    precision = setup_precision("float32", device)
    keep_freed_cpu_memory()     # as TinyMind's stage scripts do on CPU (MiniMind2's side runs with glibc's defaults)
    tokenizer = Tokenizer(os.path.join(args.minimind_dir, "model", "tokenizer.json"))  # MiniMind2's, as above
    n_steps = args.warmup_steps + args.steps
    cache_dir = tempfile.mkdtemp(prefix="tinymind-mm2-cache-")  # pretraining's token cache, removed at exit
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    datasets = {}
    for stage in args.stages:
        max_len, _, files = stage_settings(args, stage)
        if stage == "pretrain":
            datasets[stage] = PretrainDataset(files, tokenizer, max_len, cache_dir)
        elif stage == "sft":
            datasets[stage] = SFTDataset(files, tokenizer, max_len, MINIMIND_SYSTEM_PROMPT)
        else:
            datasets[stage] = DPODataset(files, tokenizer, max_len, MINIMIND_SYSTEM_PROMPT)
    dpo_flags = argparse.Namespace(beta=DPO_BETA, loss_type="sigmoid", label_smoothing=0.0, sft_weight=0.0)

    def run(stage):
        max_len, batch_size, _ = stage_settings(args, stage)
        pack = not args.no_pack      # what train_full_sft.py / train_dpo.py --pack pass
        data = datasets[stage]
        torch.manual_seed(42)
        cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                          vocab_size=tokenizer.vocab_size, hidden_dim=args.hidden_dim, max_seq_len=max_len)
        model = Transformer(cfg).to(device).train()
        # The stage scripts' loss functions, collate functions and the loop's terms_per_step estimates.
        if stage == "pretrain":
            loss_fn, collate, terms_per_step = language_model_loss, collate_blocks, batch_size * max_len
        elif stage == "sft":
            loss_fn, collate = language_model_loss, partial(collate_sft, pack=pack)
            terms_per_step = batch_size * max_len / 4
        else:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
            loss_fn, collate = make_dpo_step(reference, dpo_flags), partial(collate_pairs, pack=pack)
            terms_per_step = batch_size
        optimizer = make_optimizer(model, LEARNING_RATE[stage], 0.1, device)
        _, batches = shuffled_batches(len(data), batch_size, n_steps)
        loader = make_loader(data, batches, collate, args.num_workers, device)

        def step(batch, i):
            # trainer/loop.py run_training's step, for one process and one micro-batch.
            lr = lr_at(i, n_steps, LEARNING_RATE[stage], 0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, n_terms, metrics = loss_fn(model, batch, precision.autocast)
            (loss / terms_per_step).backward()
            _ = [loss.item(), *(float(v) for v in metrics.values())]   # what the loop reads back for its log
            correction = terms_per_step / n_terms   # -> the gradient of (loss sum) / (number of loss terms)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(correction)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def counts(batch):
            real = int((batch["targets"] != PAD_ID).sum())   # padding (and only padding) has the target PAD_ID
            useful = int(batch["loss_mask"].sum()) if stage == "sft" else real
            return {"useful": useful, "real": real, "computed": batch["input_ids"].numel()}

        seconds, totals = timed_steps(loader, step, counts, args.warmup_steps, args.steps)
        return {"seconds": seconds, **totals, "samples": len(data), "parameters": model.num_parameters()}

    return run


def worker(args):
    """A child process: build one side, then answer each stage name read from stdin with one JSON line."""
    protocol = sys.stdout
    sys.stdout = sys.stderr   # the codebases' own prints (parameter counts, progress) must not mix in
    if args.threads:
        torch.set_num_threads(args.threads)
    run = (minimind2_side if args.worker == "minimind2" else tinymind_side)(args)
    protocol.write(json.dumps({"ready": True, "threads": torch.get_num_threads()}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        result = run(line.strip())
        protocol.write(json.dumps(result) + "\n")
        protocol.flush()


class Side:
    """The parent's handle on one child process (its stderr goes to a file, shown if it fails)."""

    def __init__(self, name, argv):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker", name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        self.threads = self.reply()["threads"]

    def reply(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise SystemExit(f"the {self.name} side failed (exit {self.proc.returncode}):\n"
                             f"{self.log.read()[-3000:]}")
        return json.loads(line)

    def run(self, stage):
        self.proc.stdin.write(stage + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def git_revision(folder):
    """'sha (subject)' of a git checkout, or a note that it is not one."""
    out = subprocess.run(["git", "-C", folder, "log", "-1", "--format=%H (%s, %cs)"], capture_output=True,
                         text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def check_inputs(args, UserError):
    mm = args.minimind_dir
    if not mm:
        raise UserError(f"--minimind_dir PATH (a local MiniMind2 checkout) is needed: {GET_MINIMIND}")
    for part in ("model/model_minimind.py", "dataset/lm_dataset.py", "trainer/train_dpo.py", "model/tokenizer.json"):
        if not os.path.isfile(os.path.join(mm, part)):
            raise UserError(f"--minimind_dir {mm}: no MiniMind2 checkout there ({part} is missing); {GET_MINIMIND}")
    for package in ("transformers", "datasets==5.2.0"):   # transformers is pinned in requirements.txt already
        if importlib.util.find_spec(package.split("==")[0]) is None:
            raise UserError(f"MiniMind2's code imports `{package.split('==')[0]}`, which is not installed: "
                            f"pip install {package}")
    for stage in args.stages:
        if not stage_settings(args, stage)[2]:
            raise UserError(f"--data_dir {args.data_dir}: no {stage}_*.jsonl file there")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minimind_dir", default=None, help="a local MiniMind2 checkout (its code is imported)")
    ap.add_argument("--data_dir", default=os.path.join(ROOT, "dataset", "demo"),
                    help="folder of pretrain_*.jsonl, sft_*.jsonl, dpo_*.jsonl (MiniMind2's formats)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from: " + ", ".join(STAGES))
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--n_heads", type=int, default=8)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--hidden_dim", type=int, default=None,
                    help="FFN width (default: both codebases' 8/3 * dim rounded up to a multiple of 64)")
    # MiniMind2's --max_seq_len and --batch_size defaults per script; the same for both sides.
    ap.add_argument("--pretrain_len", type=int, default=340, help="max_length of pretraining samples")
    ap.add_argument("--sft_len", type=int, default=340, help="max_length of SFT samples")
    ap.add_argument("--dpo_len", type=int, default=1024, help="max_length of DPO sequences")
    ap.add_argument("--pretrain_batch", type=int, default=32)
    ap.add_argument("--sft_batch", type=int, default=16)
    ap.add_argument("--dpo_batch", type=int, default=4, help="pairs per batch")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round")
    ap.add_argument("--warmup_steps", type=int, default=1, help="untimed steps first, each round")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side per stage, in turns")
    ap.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes, both sides")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: torch's)")
    ap.add_argument("--no_pack", action="store_true", help="TinyMind's SFT and DPO without --pack")
    ap.add_argument("--worker", choices=SIDES, default=None,
                    help="internal: run as one side's child process (the parent starts both)")
    args = ap.parse_args()
    if args.hidden_dim is None:  # both codebases' default FFN width, fixed here so both get the same
        args.hidden_dim = 64 * ((8 * args.dim + 3 * 64 - 1) // (3 * 64))
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    return args


def main():
    from trainer.cli import UserError   # the parent only: a MiniMind2 child must never import our trainer/
    args = parse_args()
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown or not args.stages:
        raise UserError(f"--stages {','.join(args.stages)}: pick from {', '.join(STAGES)}")
    check_inputs(args, UserError)

    argv = sys.argv[1:]
    sides = {name: Side(name, argv) for name in SIDES}
    runs = {(stage, name): [] for stage in args.stages for name in SIDES}
    try:
        for stage in args.stages:
            for r in range(args.rounds):
                for name, side in sides.items():
                    result = side.run(stage)
                    result["tokens_per_s"] = result["useful"] / result["seconds"]
                    result["computed_per_s"] = result["computed"] / result["seconds"]
                    runs[stage, name].append(result)
                    print(f"{stage:8s} round {r + 1}/{args.rounds}  {name:9s} {result['tokens_per_s']:>10,.0f} "
                          f"useful tokens/s ({result['seconds']:.2f} s for {args.steps} steps)", flush=True)
            n_samples = {name: runs[stage, name][0]["samples"] for name in SIDES}
            if stage != "pretrain" and len(set(n_samples.values())) > 1:
                raise SystemExit(f"{stage}: the two sides read different numbers of samples ({n_samples}): "
                                 f"the same batches would not be the same samples")
    finally:
        for side in sides.values():
            side.close()

    def median(stage, name, key="tokens_per_s"):
        return statistics.median(r[key] for r in runs[stage, name])

    def padding(stage, name):
        last = runs[stage, name][-1]   # every round reads the same batches
        return 100 * (1 - last["real"] / last["computed"])

    params = {name: runs[args.stages[0], name][0]["parameters"] for name in SIDES}
    threads = {side.threads for side in sides.values()}
    print(f"\nMiniMind2: {os.path.abspath(args.minimind_dir)} at {git_revision(args.minimind_dir)}")
    print(f"shape: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, {args.n_kv_heads} kv heads, FFN "
          f"{args.hidden_dim}, vocab 6400, tied embeddings; parameters MiniMind2 {params['minimind2']:,}, "
          f"TinyMind {params['tinymind']:,}")
    print(f"float32, CPU, {'/'.join(map(str, sorted(threads)))} torch threads, {args.num_workers} DataLoader "
          f"workers; {args.warmup_steps} warm-up + {args.steps} timed optimizer steps per round, {args.rounds} "
          f"rounds in turns, medians; TinyMind SFT/DPO {'unpacked' if args.no_pack else 'packed (--pack)'}")
    print("\n| stage | max len | batch | useful tokens | MiniMind2 useful tok/s | TinyMind useful tok/s | ratio "
          "| padding MiniMind2 | padding TinyMind |\n|---|---|---|---|---|---|---|---|---|")
    for stage in args.stages:
        max_len, batch_size, _ = stage_settings(args, stage)
        mm, tm = median(stage, "minimind2"), median(stage, "tinymind")
        print(f"| {stage} | {max_len} | {batch_size}{' pairs' if stage == 'dpo' else ''} | {USEFUL[stage]} "
              f"| {mm:,.0f} | {tm:,.0f} | {tm / mm:.2f}x | {padding(stage, 'minimind2'):.0f}% "
              f"| {padding(stage, 'tinymind'):.0f}% |")
    # What is left once padding is taken out of the picture: the speed per position the model runs on.
    print("\n| stage | MiniMind2 computed tok/s | TinyMind computed tok/s | ratio per computed token |\n|---|---|---|---|")
    for stage in args.stages:
        mm, tm = (median(stage, name, "computed_per_s") for name in SIDES)
        print(f"| {stage} | {mm:,.0f} | {tm:,.0f} | {tm / mm:.2f}x |")
    print("\ncommand: python bench/minimind2_compare.py " + " ".join(argv))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(parse_args())   # a child process: errors keep their traceback, which the parent shows
    else:
        sys.path.insert(0, ROOT)
        from trainer.cli import run_main
        run_main(main)

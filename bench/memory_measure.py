"""Measure what DPO really holds per process, next to bench/memory_plan.py's prediction. Figures, not a test.

    python bench/memory_measure.py                      # the 25.8M and 104M shapes, 1 and 2 processes, on CPU
    python bench/memory_measure.py --shapes 512x8 --seq 256

Each strategy runs in a fresh process (or 2, under torchrun with gloo) that builds the policy (and the
reference), takes two DPO optimizer steps on random tokens and reports:
  state   the bytes of every tensor it holds for the run: weights, gradients, AdamW's moments and the reference,
          counting each storage once and, under FSDP, only this process's shards. This is the part the plan
          must predict within 15%.
  peak    the process's peak resident memory (max RSS) minus what it used before building the model: state,
          activations, the allocator's slack and temporary buffers.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.memory_plan import GB, block_params, plan  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from model.lora import BaseModel, add_lora  # noqa: E402

STRATEGIES = {   # name: (processes, plan keyword arguments)
    "DDP, live reference": (1, {"strategy": "ddp"}),
    "DDP, precomputed reference": (1, {"strategy": "ddp", "precompute_ref": True}),
    "DDP, LoRA r16": (1, {"strategy": "ddp", "lora_rank": 16}),
    "DDP x2, live reference": (2, {"strategy": "ddp"}),
    "FSDP x2, live reference": (2, {"strategy": "fsdp"}),
    "FSDP x2, LoRA r16": (2, {"strategy": "fsdp", "lora_rank": 16}),
    # --grad_checkpointing: the same state; the peak shrinks by the activations it no longer keeps.
    "DDP, live reference, checkpointing": (1, {"strategy": "ddp", "checkpointing": True}),
    "FSDP x2, LoRA r16, checkpointing": (2, {"strategy": "fsdp", "lora_rank": 16, "checkpointing": True}),
}


def rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def local(t):
    """The tensor this process really stores: a DTensor's own shard."""
    return t.to_local() if hasattr(t, "to_local") else t


def held_bytes(*tensor_lists):
    seen, total = set(), 0
    for tensors in tensor_lists:
        for t in tensors:
            t = local(t)
            key = t.untyped_storage().data_ptr()
            if key not in seen:   # tied weights share one storage
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def worker(args):
    """One process of one strategy (under torchrun when it has 2)."""
    from train_dpo import make_dpo_step
    from trainer.distributed import setup_distributed
    from trainer.fsdp import shard_model
    from trainer.loop import make_optimizer
    from trainer.precision import setup_precision

    processes, kw = STRATEGIES[args.worker]
    dist = setup_distributed("cpu")
    precision = setup_precision("float32", dist.device)
    base = rss_bytes()
    dim, n_layers = map(int, args.shape.split("x"))
    torch.manual_seed(0)
    cfg = ModelConfig(dim=dim, n_layers=n_layers, max_seq_len=args.seq)
    policy = Transformer(cfg)
    policy.set_grad_checkpointing(kw.get("checkpointing", False))
    reference = None
    if kw.get("lora_rank"):
        add_lora(policy, kw["lora_rank"], kw["lora_rank"])
        reference = BaseModel(policy)
    elif not kw.get("precompute_ref"):
        reference = copy.deepcopy(policy).requires_grad_(False)
    if kw["strategy"] == "fsdp":
        shard_model(policy, precision)
        if isinstance(reference, Transformer):
            shard_model(reference, precision)
    elif dist.enabled:
        policy = torch.nn.parallel.DistributedDataParallel(policy)
    optimizer = make_optimizer(policy, 1e-4, 0.1, dist.device)

    class DPOArgs:
        beta, loss_type, label_smoothing, sft_weight = 0.1, "sigmoid", 0.0, 0.0
    step = make_dpo_step(reference, DPOArgs)
    pairs = args.batch_size
    ids = torch.randint(3, cfg.vocab_size, (2 * pairs, args.seq))
    mask = torch.ones_like(ids)
    mask[:, : args.seq // 2] = 0        # the first half is the prompt
    batch = {"input_ids": ids, "targets": ids.roll(-1, 1), "loss_mask": mask, "n_pairs": pairs}
    if reference is None:
        batch["ref_logps"] = torch.zeros(pairs, 2)
    for _ in range(2):
        loss, _, _ = step(policy, batch, precision.autocast)
        loss.backward()
        optimizer.step()
        # Measured after the step, before zero_grad: gradients and optimizer state both exist here.
        params = list(policy.parameters())
        state = held_bytes(params, [p.grad for p in params if p.grad is not None],
                           [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
                            and v.dim() > 0],
                           list(reference.parameters()) if isinstance(reference, Transformer) else [])
        optimizer.zero_grad(set_to_none=True)
    if dist.is_main:
        print(json.dumps({"state": state, "peak": rss_bytes() - base}), flush=True)
    if dist.enabled:
        torch.distributed.destroy_process_group()


def run(name, args):
    processes, _ = STRATEGIES[name]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    cmd = launcher + [os.path.abspath(__file__), "--worker", name, "--shape", args.shape, "--seq", str(args.seq),
                      "--batch_size", str(args.batch_size)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="512x8,768x16", help="DIMxLAYERS, comma-separated (25.8M and 104M)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--batch_size", type=int, default=2, help="pairs per process")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print("| shape | strategy | state planned | state measured | measured / planned | peak RSS measured | "
          "planned total |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        args.shape = shape
        dim, n_layers = map(int, shape.split("x"))
        cfg = ModelConfig(dim=dim, n_layers=n_layers)
        for name, (processes, kw) in STRATEGIES.items():
            parts = plan(cfg, devices=processes, stage="dpo", batch_size=args.batch_size, max_seq_len=args.seq,
                         dtype="float32", **kw)
            # At rest (between steps) FSDP holds no gathered block: compare the state without it.
            state_plan = parts["grads"] + parts["optimizer"] + parts["reference"] + parts["weights"]
            if kw["strategy"] == "fsdp":
                state_plan -= block_params(cfg) * 4
            got = run(name, args)
            print(f"| {dim}x{n_layers} | {name} | {state_plan / GB:.3f} GB | {got['state'] / GB:.3f} GB | "
                  f"{got['state'] / state_plan:.3f} | {got['peak'] / GB:.3f} GB | {sum(parts.values()) / GB:.3f} GB |",
                  flush=True)


if __name__ == "__main__":
    main()

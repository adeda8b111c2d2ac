"""Plan the memory of a training run per device, before renting the GPUs. Figures, not a test.

    python bench/memory_plan.py --dim 768 --n_layers 16 --batch_size 8 --max_seq_len 512 --devices 2
    python bench/memory_plan.py --params 72e9 --devices 8 --gpu_gb 80 --stage dpo --batch_size 1 --max_seq_len 2048

For each strategy it prints what one device holds, in GB:
  weights     the trained weights (float32 master copies, as TinyMind keeps them), or LoRA's frozen base
  grads       one gradient per trained weight (float32)
  optimizer   AdamW's two moments per trained weight (2 x float32)
  reference   DPO's frozen reference model (none with LoRA: the base with adapters off; none precomputed)
  activations what the backward pass needs from the forward (per block, summed over blocks), plus the
              float32 logits and their gradient over the vocabulary
Strategies: DDP (every device holds everything), FSDP over N devices (weights, grads, optimizer state and the
reference divided by N, plus one gathered block at a time), LoRA rank r (only r*(in+out) per adapted matrix is
trained), with and without activation checkpointing (keep only each block's input, recompute the rest).

The state part (weights + grads + optimizer + reference) is exact arithmetic on the shapes: bench/memory_measure.py
checks it against what processes really hold. The activation part is an estimate (how many values each block
saves, below); the allocator, the framework and temporary buffers come on top.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.config import ModelConfig  # noqa: E402
from model.lora import LORA_TARGETS  # noqa: E402

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def llama_like(params):
    """A Llama-shaped config of about `params` parameters: head_dim 128, 8 kv heads, SwiGLU 8/3, a 32k
    vocabulary, dim ~ 110 x n_layers (Llama-2 70B: 8192 / 80; 13B: 5120 / 40), then the number of layers that
    comes closest to `params`. A block has ~12 dim^2 parameters, so dim^3 ~ params * 110 / 12."""
    dim = max(1024, 1024 * round((params * 110 / 12) ** (1 / 3) / 1024))
    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=dim // 128, n_kv_heads=8, vocab_size=32000, max_seq_len=4096)
    cfg.n_layers = max(1, round((params - total_params(cfg) + block_params(cfg)) / block_params(cfg)))
    return cfg


def matrices(cfg):
    """(name, in, out) of every linear layer of one block."""
    kv = cfg.n_kv_heads * cfg.head_dim
    return [("wq", cfg.dim, cfg.n_heads * cfg.head_dim), ("wk", cfg.dim, kv), ("wv", cfg.dim, kv),
            ("wo", cfg.n_heads * cfg.head_dim, cfg.dim), ("w1", cfg.dim, cfg.hidden_dim),
            ("w2", cfg.hidden_dim, cfg.dim), ("w3", cfg.dim, cfg.hidden_dim)]


def block_params(cfg):
    return sum(i * o for _, i, o in matrices(cfg)) + 2 * cfg.dim          # + the two RMSNorm gains


def total_params(cfg):
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.dim
    return cfg.vocab_size * cfg.dim + head + cfg.n_layers * block_params(cfg) + cfg.dim


def lora_params(cfg, rank, targets=LORA_TARGETS):
    return cfg.n_layers * sum(rank * (i + o) for name, i, o in matrices(cfg) if name in targets)


def activation_bytes(cfg, tokens, dtype, checkpointing):
    """What the backward pass keeps from the forward, for `tokens` tokens (batch x sequence, all sequences).

    Per block and token, the values saved for backward (SDPA saves q, k, v, its output and a per-row
    logsumexp, never the T x T attention matrix): the two RMSNorm inputs and outputs (4 dim), q and k before
    and after RoPE and v (3 dim + 3 kv), the attention output (dim), SwiGLU's w1 and w3 outputs, silu and
    their product (4 hidden). Under autocast these are in the compute dtype (the norms' float32 inputs aside).
    Plus the logits over the vocabulary in float32 and their gradient (2 x 4 bytes a class).
    With checkpointing each block keeps only its input, and one block's activations exist during recompute."""
    kv = cfg.n_kv_heads * cfg.head_dim
    per_block_values = 8 * cfg.dim + 3 * kv + 4 * cfg.hidden_dim
    per_block = tokens * per_block_values * DTYPE_BYTES[dtype]
    logits = tokens * cfg.vocab_size * 8
    if checkpointing:
        return cfg.n_layers * tokens * cfg.dim * 4 + per_block + logits
    return cfg.n_layers * per_block + logits


def plan(cfg, *, devices=1, strategy="ddp", stage="sft", lora_rank=0, precompute_ref=False, checkpointing=False,
         batch_size=1, max_seq_len=512, dtype="float32", frozen_dtype="float32"):
    """Bytes per device, by part. strategy: 'ddp' (a full copy per device) or 'fsdp' (sharded over devices).
    stage 'dpo' adds the frozen reference and doubles the sequences (chosen + rejected). frozen_dtype: how
    weights that are never trained are stored (LoRA's base, the reference); TinyMind keeps them in float32."""
    fb = DTYPE_BYTES[frozen_dtype]
    n = total_params(cfg)
    shards = devices if strategy == "fsdp" else 1
    trained = lora_params(cfg, lora_rank) if lora_rank else n
    # FSDP gathers one block's full weights (in the compute dtype) around its forward and its backward.
    gathered = block_params(cfg) * DTYPE_BYTES[dtype] if strategy == "fsdp" else 0
    parts = {
        "weights": ((n * fb + trained * 4 if lora_rank else n * 4) / shards) + gathered,
        "grads": trained * 4 / shards,
        "optimizer": trained * 8 / shards,
        "reference": n * fb / shards if stage == "dpo" and not lora_rank and not precompute_ref else 0,
    }
    sequences = batch_size * (2 if stage == "dpo" else 1)
    parts["activations"] = activation_bytes(cfg, sequences * max_seq_len, dtype, checkpointing)
    return parts


def strategies(devices, lora_rank):
    """The combinations worth comparing: (label, plan keyword arguments)."""
    rows = [("DDP", {"strategy": "ddp"}), ("DDP + precomputed ref", {"strategy": "ddp", "precompute_ref": True}),
            (f"DDP + LoRA r{lora_rank}", {"strategy": "ddp", "lora_rank": lora_rank})]
    if devices > 1:
        rows += [(f"FSDP x{devices}", {"strategy": "fsdp"}),
                 (f"FSDP x{devices} + precomputed ref", {"strategy": "fsdp", "precompute_ref": True}),
                 (f"FSDP x{devices} + LoRA r{lora_rank}", {"strategy": "fsdp", "lora_rank": lora_rank})]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=None, help="model size, e.g. 72e9 (a Llama-like shape)")
    ap.add_argument("--dim", type=int, default=768, help="used when --params is not given")
    ap.add_argument("--n_layers", type=int, default=16)
    ap.add_argument("--n_heads", type=int, default=8)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=6400)
    ap.add_argument("--stage", choices=["sft", "dpo"], default="dpo", help="dpo: + reference, 2 sequences a pair")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--gpu_gb", type=float, default=80.0, help="memory of one device, for the 'fits' column")
    ap.add_argument("--batch_size", type=int, default=1, help="per device (pairs for dpo)")
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16", help="the compute dtype")
    ap.add_argument("--lora_rank", type=int, default=16)
    ap.add_argument("--frozen_dtype", choices=sorted(DTYPE_BYTES), default="float32",
                    help="storage of never-trained weights (LoRA base, reference); TinyMind today: float32")
    args = ap.parse_args()
    if args.params:
        cfg = llama_like(args.params)
    else:
        cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                          vocab_size=args.vocab)
    print(f"model: {total_params(cfg) / 1e9:.3f}B parameters (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} "
          f"heads / {cfg.n_kv_heads} kv, ffn {cfg.hidden_dim}, vocab {cfg.vocab_size}); {args.stage}, batch "
          f"{args.batch_size} x {args.max_seq_len} tokens per device, {args.dtype} compute, float32 master weights, {args.frozen_dtype} frozen weights")
    print(f"\n| strategy | checkpointing | weights | grads | optimizer | reference | activations | total GB | "
          f"fits {args.gpu_gb:g} GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, kwargs in strategies(args.devices, args.lora_rank):
        for ckpt in (False, True):
            parts = plan(cfg, devices=args.devices, stage=args.stage, checkpointing=ckpt, batch_size=args.batch_size,
                         max_seq_len=args.max_seq_len, dtype=args.dtype, frozen_dtype=args.frozen_dtype, **kwargs)
            total = sum(parts.values()) / GB
            cells = " | ".join(f"{parts[k] / GB:.2f}" for k in ("weights", "grads", "optimizer", "reference",
                                                                 "activations"))
            print(f"| {label} | {'yes' if ckpt else 'no'} | {cells} | {total:.1f} | "
                  f"{'yes' if total < args.gpu_gb * 0.9 else 'no'} |")
    print(f"\n'fits' leaves 10% for the allocator and buffers. Per-device memory does not shrink with more devices "
          f"under DDP; under FSDP the state part is divided by {args.devices}.")


if __name__ == "__main__":
    main()

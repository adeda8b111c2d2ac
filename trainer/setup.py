"""The start and end of every stage script: processes, seeds, precision; and the model's first report."""
import random

import numpy as np
import torch

from trainer.cli import UserError
from trainer.distributed import cleanup_distributed, setup_distributed
from trainer.precision import setup_precision


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def start(args):
    """Join the process group (if under torchrun), pick device and precision, seed. Every rank uses the same
    seed here, so models built next are initialised identically; call `seed_rank` after building them."""
    dist = setup_distributed(args.device)
    precision = setup_precision(args.dtype, dist.device)
    seed_everything(args.seed)
    dist.print(f"device {dist.device} x {dist.world_size} process(es); precision: {precision.describe()}")
    return dist, precision


def seed_rank(args, dist):
    """Per-rank random streams (dropout differs across ranks, as it would with one big batch)."""
    seed_everything(args.seed + dist.rank)


def describe_model(model, dist):
    n = model.num_parameters()
    cfg = model.cfg
    dist.print(f"model: {n / 1e6:.2f}M parameters ({n:,}); dim {cfg.dim}, {cfg.n_layers} layers, "
               f"{cfg.n_heads} heads / {cfg.n_kv_heads} kv heads, ffn {cfg.hidden_dim}, vocab {cfg.vocab_size}")


def apply_lora(model, args):
    """Wrap the model's target layers in LoRA adapters per --lora_rank/--lora_alpha/--lora_targets and freeze
    the rest. Returns the settings, saved next to the adapters so they can be rebuilt (attach_lora)."""
    from model.lora import LORA_TARGETS, add_lora
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if not targets or set(targets) - set(LORA_TARGETS):
        raise UserError(f"--lora_targets {args.lora_targets}: choose from {','.join(LORA_TARGETS)}")
    alpha = args.lora_alpha if args.lora_alpha is not None else float(args.lora_rank)
    n = add_lora(model, args.lora_rank, alpha, targets=targets)
    return {"rank": args.lora_rank, "alpha": alpha, "targets": list(targets), "trainable_parameters": n}


def finish():
    cleanup_distributed()

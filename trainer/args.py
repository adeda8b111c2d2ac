"""The command-line flags every stage shares (MiniMind2's names), plus helpers to turn them into objects."""
from trainer.cli import (ArgumentParser, fraction, non_negative_float, non_negative_int, positive_float,
                         positive_int)

# Flags a --resume must not change: they decide which samples each step reads (the data order) or the
# learning-rate schedule, so changing them mid-run silently makes a different run (the LR jumps, samples are
# seen twice or never). The global batch is checked as one number: 2 processes x 4 == 1 process x 8.
RESUME_FIXED = ("data_path", "max_seq_len", "epochs", "max_steps", "learning_rate", "warmup_iters", "min_lr_ratio",
                "seed", "skip_bad_lines")


def base_parser(description, *, stage, lr, epochs, batch_size, max_seq_len, data_path, save_interval=100,
                warmup_iters=0):
    """A parser with the flags all stages share; each stage passes its own defaults and adds its own flags."""
    p = ArgumentParser(description=description)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_path", default=data_path,
                   help="JSONL file(s): comma-separated, globs allowed; a file named twice is read twice")
    g.add_argument("--eval_path", default=None, help="held-out JSONL: its loss is measured before and after")
    g.add_argument("--out_dir", default="out", help="where checkpoints, resume files and logs go")
    g.add_argument("--save_name", default=stage, help="checkpoint prefix: {out_dir}/{save_name}_{dim}.pth")
    g.add_argument("--tokenizer_path", default=None,
                   help="tokenizer.json (pretraining default: model/tokenizer/; later stages use their checkpoint's "
                        "and refuse another)")
    g.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed lines instead of stopping")
    g.add_argument("--num_workers", type=non_negative_int, default=0, help="DataLoader worker processes")

    g = p.add_argument_group("model (a later stage takes these from its checkpoint; given, they must match it)")
    g.add_argument("--dim", type=positive_int, default=None,
                   help="width of the residual stream (default: the checkpoint's; pretraining: 512)")
    g.add_argument("--n_layers", type=positive_int, default=None,
                   help="transformer blocks (default: the checkpoint's; pretraining: 8)")
    g.add_argument("--n_heads", type=positive_int, default=None,
                   help="query heads (default: the checkpoint's; pretraining: 8)")
    g.add_argument("--n_kv_heads", type=positive_int, default=None,
                   help="key/value heads (default: the checkpoint's; pretraining: 2)")
    g.add_argument("--max_seq_len", type=positive_int, default=max_seq_len, help="context length in tokens")
    g.add_argument("--dropout", type=fraction, default=None,
                   help="dropout probability (default: the checkpoint's; pretraining: 0.0)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="passes over the data")
    g.add_argument("--max_steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps (default: all the epochs' steps)")
    g.add_argument("--batch_size", type=positive_int, default=batch_size, help="samples per process, per micro-step")
    g.add_argument("--accumulation_steps", type=positive_int, default=1,
                   help="micro-steps summed into one optimizer step")
    g.add_argument("--learning_rate", type=positive_float, default=lr, help="peak learning rate")
    g.add_argument("--warmup_iters", type=non_negative_int, default=warmup_iters,
                   help="steps of linear warmup to the peak")
    g.add_argument("--min_lr_ratio", type=fraction, default=0.1, help="cosine decays to learning_rate * this")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.1, help="AdamW weight decay (matrices only)")
    g.add_argument("--grad_clip", type=non_negative_float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=42, help="seeds the initialisation, the data order and dropout")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU that supports it, else float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="store only each block's input and recompute the block in the backward pass: activation "
                        "memory of one block instead of all, for about a third more compute")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state over the torchrun processes (FSDP2) "
                        "instead of a full copy each (DDP)")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log_interval", type=positive_int, default=10, help="steps between log lines")
    g.add_argument("--save_interval", type=non_negative_int, default=save_interval,
                   help="steps between checkpoints (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from {out_dir}/{save_name}_{dim}_resume.pth")
    g.add_argument("--use_wandb", action="store_true",
                   help="log to Weights & Biases (offline when no API key is set up)")
    g.add_argument("--wandb_project", default="TinyMind", help="wandb project name")
    g.add_argument("--no_progress", action="store_true",
                   help="no progress bar: a log line every --log_interval steps instead")
    return p


def add_lora_flags(parser, default_rank):
    """--lora_rank / --lora_alpha / --lora_targets (model/lora.py), for train_lora.py and train_dpo.py."""
    from model.lora import LORA_TARGETS
    g = parser.add_argument_group("LoRA (train low-rank adapters; the base weights stay frozen)")
    g.add_argument("--lora_rank", type=positive_int, default=default_rank,
                   help="rank r of each adapter B A" + ("" if default_rank else " (default: no LoRA, full training)"))
    g.add_argument("--lora_alpha", type=positive_float, default=None,
                   help="the update is scaled by alpha / r (default: alpha = r, scale 1, as in MiniMind2's LoRA)")
    g.add_argument("--lora_targets", default=",".join(LORA_TARGETS),
                   help="comma-separated linear layers of each block that get adapters")


def add_pack_flag(parser):
    """--pack, for the stages whose samples vary in length (SFT, LoRA, DPO): see dataset/packing.py."""
    parser.add_argument("--pack", action="store_true",
                        help="lay each micro-batch's samples end to end in one row (attention and positions kept "
                             "per sample) instead of padding every sample to the batch's longest: the same loss, "
                             "no padding computed")


def model_flags(args):
    """The model-config values given on the command line (None = not given)."""
    return {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "dropout")}

"""The command-line flags every stage shares (MiniMind2's names), plus helpers to turn them into objects."""
import argparse


def base_parser(description, *, stage, lr, epochs, batch_size, max_seq_len, data_path, save_interval=100,
                warmup_iters=0):
    """A parser with the flags all stages share; each stage passes its own defaults and adds its own flags."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_path", default=data_path,
                   help="JSONL file(s): comma-separated, globs allowed; a file named twice is read twice")
    g.add_argument("--eval_path", default=None, help="held-out JSONL: its loss is measured before and after")
    g.add_argument("--out_dir", default="out")
    g.add_argument("--save_name", default=stage, help="checkpoint prefix: {out_dir}/{save_name}_{dim}.pth")
    g.add_argument("--tokenizer_path", default=None, help="tokenizer.json (default: model/tokenizer/)")
    g.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed lines instead of stopping")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")

    g = p.add_argument_group("model (architecture flags default to the checkpoint's or MiniMind2's values)")
    g.add_argument("--dim", type=int, default=None)
    g.add_argument("--n_layers", type=int, default=None)
    g.add_argument("--n_heads", type=int, default=None)
    g.add_argument("--n_kv_heads", type=int, default=None)
    g.add_argument("--max_seq_len", type=int, default=max_seq_len)
    g.add_argument("--dropout", type=float, default=None)

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch_size", type=int, default=batch_size, help="per process, per micro-step")
    g.add_argument("--accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=lr, help="peak learning rate")
    g.add_argument("--warmup_iters", type=int, default=warmup_iters)
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to learning_rate * this")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU that supports it, else float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log_interval", type=int, default=10, help="steps between log lines")
    g.add_argument("--save_interval", type=int, default=save_interval, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from {out_dir}/{save_name}_{dim}_resume.pth")
    g.add_argument("--use_wandb", action="store_true")
    g.add_argument("--wandb_project", default="TinyMind")
    g.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    return p


def model_flags(args):
    """The model-config values given on the command line (None = not given)."""
    return {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "dropout")}

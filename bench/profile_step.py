"""Where a training step's time goes: torch.profiler over forward, backward and the optimizer. Figures, not a test.

    python bench/profile_step.py                                   # the demo shape (dim 128, 4 layers, seq 256)
    python bench/profile_step.py --dim 512 --n_layers 8 --batch_size 4 --max_seq_len 512     # the 26M shape
    python bench/profile_step.py --rev a0d4c2a                     # the same, on an older revision's model code

Prints the step time split into its three phases, the share of the time spent in matrix multiplications
(mm/addmm/bmm and the attention kernel) against everything else, and the top operators by self CPU time.
--rev checks the revision out with `git worktree` (as bench/compare.py does) and profiles ITS model, optimizer
and loss with this script, so a before/after table compares code, not benchmarks.
The profiler inflates small element-wise ops several-fold (the 104M step's SwiGLU product: 8 ms a call profiled,
0.96 ms timed), so read its shares as where to look; bench/matmul_bound.py measures the non-matmul time unprofiled.
"""
import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Operators that are matrix multiplications (forward and backward): the work a faster step cannot avoid.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile(args):
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    sys.path.insert(0, args.root)
    from model import ModelConfig, Transformer
    from trainer import losses, setup
    from trainer.loop import make_optimizer

    keep_freed_memory = getattr(setup, "keep_freed_cpu_memory", None)   # what the stage scripts do, where they do
    if keep_freed_memory is not None:
        keep_freed_memory()
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      max_seq_len=args.max_seq_len)
    model = Transformer(cfg)
    optimizer = make_optimizer(model, 1e-4, 0.1, torch.device("cpu"))
    chunked = getattr(losses, "chunked_next_token_loss", None)   # older revisions build all the logits
    x = torch.randint(3, cfg.vocab_size, (args.batch_size, args.max_seq_len + 1))

    def step():
        with record_function("1 forward"):
            if chunked is not None:
                loss, n = chunked(model(x[:, :-1], return_hidden=True), model.output.weight, x[:, 1:])
            else:
                loss, n = losses.next_token_loss(model(x[:, :-1]), x[:, 1:])
        with record_function("2 backward"):
            (loss / n).backward()
        with record_function("3 optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup_steps):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)        # microseconds, all steps
    per_step_ms = total / args.steps / 1000
    tokens = args.batch_size * args.max_seq_len
    print(f"model: dim {args.dim}, {args.n_layers} layers, seq {args.max_seq_len}, batch {args.batch_size}, "
          f"{model.num_parameters() / 1e6:.2f}M parameters, {torch.get_num_threads()} threads, "
          f"head loss {'chunked' if chunked else 'plain'} ({args.root})")
    print(f"step: {per_step_ms:.1f} ms of self CPU time ({tokens / per_step_ms * 1000:,.0f} tokens/s), "
          f"{args.steps} profiled steps")
    for e in sorted((e for e in events if e.key[:2] in ("1 ", "2 ", "3 ")), key=lambda e: e.key):
        print(f"  {e.key[2:]:10s} {e.cpu_time_total / args.steps / 1000:8.1f} ms")
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    print(f"matmul share: {100 * matmul / total:.1f}% ({matmul / args.steps / 1000:.1f} ms), "
          f"everything else {100 * (total - matmul) / total:.1f}%")
    print("\n| operator | self ms / step | share | calls / step |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        if e.key[:2] in ("1 ", "2 ", "3 "):
            continue
        print(f"| {e.key} | {e.self_cpu_time_total / args.steps / 1000:.2f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count // args.steps} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--max_seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    ap.add_argument("--warmup_steps", type=int, default=3,
                    help="untimed steps first: at the 104M shape steps 2 and 3 still allocate for the first time "
                         "(their element-wise ops ran 2-7x slower), as in bench/train_throughput.py")
    ap.add_argument("--top", type=int, default=15, help="operators listed")
    ap.add_argument("--rev", help="profile this git revision's code instead of the working tree's")
    ap.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)   # set by --rev for the child process
    args = ap.parse_args()
    if not args.rev:
        return profile(args)
    with tempfile.TemporaryDirectory(prefix="tinymind-profile-") as tmp:
        path = os.path.join(tmp, "rev")
        subprocess.run(["git", "worktree", "add", "--detach", path, args.rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            child = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("rev", "root")]
            subprocess.run([sys.executable, os.path.abspath(__file__), *child, "--root", path], check=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", path], cwd=ROOT, capture_output=True)


if __name__ == "__main__":
    main()

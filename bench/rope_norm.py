"""RoPE and RMSNorm, forward + backward: two ways of writing each. Figures, not a test.

    python bench/rope_norm.py                  # the demo shape and the 26M shape

RoPE: the usual x * cos + rotate_half(x) * sin (rotate_half = cat(-x2, x1), full-width tables) vs model/model.py's
apply_rope (the two halves, half-width tables). RMSNorm: model/model.py's (five element-wise ops in float32) vs
PyTorch's fused F.rms_norm. The two run in turns, so a busy neighbour slows both alike; the median of --repeats
timings is printed, with the largest difference of their outputs.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.model import RMSNorm, apply_rope, rope_tables  # noqa: E402


def rope_rotate_half(x, cos, sin):
    half = x.shape[-1] // 2
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)     # full-width tables
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


# The two shapes every comparison runs at (label, batch, sequence, dim, heads), and the header of compare's rows.
SHAPES = (("demo", 16, 256, 128, 4), ("26M", 4, 512, 512, 8))
TABLE_HEADER = "| what (shape) | first ms | second ms | first / second | max diff |\n|---|---|---|---|---|"


def fwd_bwd_seconds(fn, inputs, needs_grad):
    """Seconds of fn(*inputs) and, when any input needs a gradient, of its backward pass."""
    leaves = [t.detach().requires_grad_(g) for t, g in zip(inputs, needs_grad)]
    start = time.perf_counter()
    out = fn(*leaves)
    if any(needs_grad):
        out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def compare(name, first, second, inputs, needs_grad, repeats):
    """One table row: the median times of first and second (timed in turns), their ratio, the outputs' largest
    difference. Also used by bench/fusions.py."""
    a, b = [], []
    for _ in range(repeats):
        a.append(fwd_bwd_seconds(first, inputs, needs_grad))
        b.append(fwd_bwd_seconds(second, inputs, needs_grad))
    diff = (first(*inputs) - second(*inputs)).abs().max().item()
    ma, mb = statistics.median(a) * 1000, statistics.median(b) * 1000
    print(f"| {name} | {ma:.2f} | {mb:.2f} | {ma / mb:.2f}x | {diff:.1e} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, median of {args.repeats}, forward + backward\n")
    print(TABLE_HEADER)
    for label, B, T, dim, heads in SHAPES:
        head_dim = dim // heads
        cos, sin = rope_tables(head_dim, T, 1e6)
        q = torch.randn(B, heads, T, head_dim)
        compare(f"RoPE on q, {label} ({B}x{heads}x{T}x{head_dim}): rotate_half, then apply_rope", rope_rotate_half,
                apply_rope, (q, cos, sin), (True, False, False), args.repeats)
        x, ours = torch.randn(B, T, dim), RMSNorm(dim, 1e-5)    # ours computes with its own weight (ones)
        compare(f"RMSNorm, {label} ({B}x{T}x{dim}): model/model.py's, then F.rms_norm",
                lambda x, w: ours(x), lambda x, w: F.rms_norm(x, (dim,), w, 1e-5), (x, ours.weight.detach()),
                (True, True), args.repeats)


if __name__ == "__main__":
    main()

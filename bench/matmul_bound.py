"""How fast could a training step be if it did nothing but its matmuls? CPU, float32. Figures, not a test.

    python bench/matmul_bound.py                          # the 104M shape (dim 768, 16 layers, 2 x 512)
    python bench/matmul_bound.py --dim 128 --n_layers 4 --n_heads 4 --max_seq_len 256 --batch_size 16 --steps 10

Times every matmul and attention-kernel call inside real training steps (forward, backward, through a
TorchDispatchMode: a clock around each such call) and compares their sum with the step's wall time. The sum
is the step with all the rest (norms, RoPE, SiLU, softmax, AdamW, allocation, Python) at zero cost: an upper
bound on what removing non-matmul work can give, and with it on MFU, which no eager change short of faster
kernels can pass. "The rest" is each timed step's wall time minus its kernels' time: both come from the same
step, so the load of the other tenants of a shared CPU (which moves a step by 20% from one minute to the
next) slows both alike. It includes the mode's own cost, a Python call per operator, which the script
estimates from untimed steps run in turns with the timed ones (4-7% of the demo step, under 2% at 26M and
104M).
No profiler: torch.profiler inflates small element-wise ops several-fold (the 104M step's SwiGLU product:
8 ms a call profiled, 0.96 ms timed with perf_counter, in one-off scripts).
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_throughput import add_shape_flags, measured_matmul_peak  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from trainer.loop import make_optimizer  # noqa: E402
from trainer.losses import chunked_next_token_loss  # noqa: E402
from trainer.setup import keep_freed_cpu_memory  # noqa: E402

aten = torch.ops.aten
KERNELS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


class TimeKernels(TorchDispatchMode):
    """Each KERNELS call while the mode is on: (operator, its tensors' shapes, seconds)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in KERNELS:
            return func(*args, **(kwargs or {}))
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - t
        self.calls.append((func, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)], seconds))
        return out

    @property
    def seconds(self):
        return sum(call[2] for call in self.calls)


def print_slowest_matmuls(calls, top):
    """The matmul shapes that take the most time in one step, with the rate they run at."""
    by_shape = {}
    for func, shapes, seconds in calls:
        if func is aten.mm.default:
            (m, k), (_, n) = shapes
            total = by_shape.setdefault((m, k, n), [0, 0.0])
            total[0] += 1
            total[1] += seconds
    for (m, k, n), (count, seconds) in sorted(by_shape.items(), key=lambda item: -item[1][1])[:top]:
        print(f"  mm ({m} x {k}) @ ({k} x {n}) x{count}: {seconds * 1000:7.1f} ms, "
              f"{2 * m * k * n * count / seconds / 1e9:5.0f} GFLOP/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_flags(ap)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first (first allocations)")
    ap.add_argument("--top", type=int, default=8, help="matmul shapes listed")
    args = ap.parse_args()

    keep_freed_cpu_memory()      # as every stage script does
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      max_seq_len=args.max_seq_len)
    model = Transformer(cfg)
    optimizer = make_optimizer(model, 1e-4, 0.1, torch.device("cpu"))
    T, B = args.max_seq_len, args.batch_size
    x = torch.randint(3, cfg.vocab_size, (B, T + 1))

    def step():      # bench/train_throughput.py's float32 step
        loss, n = chunked_next_token_loss(model(x[:, :-1], return_hidden=True), model.output.weight, x[:, 1:])
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The peak before the steps and after them, the higher one counted, as bench/train_throughput.py does.
    peak_before = measured_matmul_peak(torch.device("cpu"), torch.float32)
    for _ in range(args.warmup_steps):
        step()
    walls, kernels, plain = [], [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()                                      # the step as it runs, without the timer's cost
        plain.append(time.perf_counter() - t)
        timer = TimeKernels()
        with timer:
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
        kernels.append(timer.seconds)
    peak_after = measured_matmul_peak(torch.device("cpu"), torch.float32)
    peak = max(peak_before, peak_after)

    flops = (6 * model.num_parameters() + 12 * cfg.n_layers * cfg.dim * T) * B * T   # as train_throughput.py
    wall, timed, kernel = statistics.median(plain), statistics.median(walls), statistics.median(kernels)
    rest = [1 - k / w for w, k in zip(walls, kernels)]      # within each timed step: the timer's cost included

    def rate(seconds):
        return f"{B * T / seconds:,.0f} tokens/s, MFU {100 * flops / seconds / peak:.1f}%"

    n_attention = sum(f.__name__.startswith("_scaled") for f, _, _ in timer.calls)
    print(f"model        {model.num_parameters() / 1e6:.2f}M parameters, dim {cfg.dim}, {cfg.n_layers} layers, "
          f"seq {T}, batch {B}, float32, {torch.get_num_threads()} threads; medians of {args.steps} steps")
    print(f"kernels      {len(timer.calls)} calls per step ({n_attention} of them attention)")
    print(f"step         {wall * 1000:,.1f} ms  ({rate(wall)})")
    print(f"its kernels  {kernel * 1000:,.1f} ms  ({rate(kernel)}: the bound), timed in steps run in turns under "
          f"the timer ({timed * 1000:,.1f} ms: the timer's own cost is {(timed - wall) * 1000:,.1f} ms)")
    print(f"the rest     {100 * (1 - kernel / wall):.1f}% of the step; a step of kernels alone would be "
            f"{wall / kernel:.2f}x as fast")
    print(f"             {100 * statistics.median(rest):.1f}% of a timed step, the timer's cost included (per step: "
          f"{', '.join(f'{100 * r:.1f}%' for r in rest)})")
    print(f"peak         {peak / 1e12:.3f} TFLOP/s (square float32 matmul: before the steps "
          f"{peak_before / 1e12:.3f}, after {peak_after / 1e12:.3f}, the higher)")
    print("slowest matmul shapes in the last step:")
    print_slowest_matmuls(timer.calls, args.top)


if __name__ == "__main__":
    main()

"""How fast could a training step be if it did nothing but its matmuls? CPU, float32. Figures, not a test.

    python bench/matmul_bound.py                          # the 104M shape (dim 768, 16 layers, 2 x 512)
    python bench/matmul_bound.py --dim 128 --n_layers 4 --n_heads 4 --max_seq_len 256 --batch_size 16   # demo

Times every matmul and attention-kernel call inside real training steps (forward, backward, through a
TorchDispatchMode: a clock around each such call) and compares their sum with the step's wall time. The sum
is the step with all the rest (norms, RoPE, SiLU, softmax, AdamW, allocation, Python) at zero cost: an upper
bound on what removing non-matmul work can give, and with it on MFU, which no eager change short of faster
kernels can pass. "The rest" is each timed step's wall time minus its kernels' time: both come from the same
step, so the load of the other tenants of a shared CPU (which moves a step by 20% from one minute to the
next) slows both alike. It includes the mode's own cost, a Python call per operator, which the script
estimates from untimed steps run in turns with the timed ones (4-7% of the demo step, under 1% at 104M).
No profiler: torch.profiler inflates small element-wise ops several-fold (the 104M step's SwiGLU product:
8 ms a call profiled, 0.96 ms timed).
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_throughput import measured_matmul_peak  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from trainer.loop import make_optimizer  # noqa: E402
from trainer.losses import chunked_next_token_loss  # noqa: E402
from trainer.setup import keep_freed_cpu_memory  # noqa: E402

aten = torch.ops.aten
KERNELS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


class TimeKernels(TorchDispatchMode):
    """Seconds spent in KERNELS operators while the mode is on, and each call: (operator, its tensors' shapes)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in KERNELS:
            return func(*args, **(kwargs or {}))
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - t
        self.calls.append((func, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--n_layers", type=int, default=16)
    ap.add_argument("--n_heads", type=int, default=8)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup_steps", type=int, default=3)
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
    peak = measured_matmul_peak(torch.device("cpu"), torch.float32)

    flops = (6 * model.num_parameters() + 12 * cfg.n_layers * cfg.dim * T) * B * T   # as train_throughput.py
    wall, timed, kernel = statistics.median(plain), statistics.median(walls), statistics.median(kernels)
    rest = [1 - k / w for w, k in zip(walls, kernels)]      # within each timed step: the timer's cost included
    mfu = lambda seconds: f"{B * T / seconds:,.0f} tokens/s, MFU {100 * flops / seconds / peak:.1f}%"
    n_attention = sum(f.__name__.startswith("_scaled") for f, _ in timer.calls)
    print(f"model        {model.num_parameters() / 1e6:.2f}M parameters, dim {cfg.dim}, {cfg.n_layers} layers, "
          f"seq {T}, batch {B}, float32, {torch.get_num_threads()} threads; medians of {args.steps} steps")
    print(f"kernels      {len(timer.calls)} calls per step ({n_attention} of them attention)")
    print(f"step         {wall * 1000:,.1f} ms  ({mfu(wall)})")
    print(f"its kernels  {kernel * 1000:,.1f} ms  ({mfu(kernel)}: the bound), timed in steps run in turns under "
          f"the timer ({timed * 1000:,.1f} ms: the timer's own cost is {(timed - wall) * 1000:,.1f} ms)")
    print(f"the rest     {100 * statistics.median(rest):.1f}% of a timed step, the timer's cost included (per step: "
          f"{', '.join(f'{100 * r:.1f}%' for r in rest)}); a step of kernels alone would be "
          f"{wall / kernel:.2f}x as fast")
    print(f"peak         {peak / 1e12:.3f} TFLOP/s (square float32 matmul, measured after the steps)")

if __name__ == "__main__":
    main()

"""How fast could a training step be if it did nothing but its matmuls? CPU, float32. Figures, not a test.

    python bench/matmul_bound.py                          # the 104M shape (dim 768, 16 layers, 2 x 512), float32
    python bench/matmul_bound.py --dim 128 --n_layers 4 --n_heads 4 --max_seq_len 256 --batch_size 16   # demo

Records every matmul and attention-kernel call of one training step (forward, backward, through a
TorchDispatchMode: the operator and its tensors' shapes and strides), then replays those calls alone, on random
tensors of the same layouts, timing each. Their sum is the step's time with all the rest (norms, RoPE, SiLU,
softmax, AdamW, allocation) at zero cost: an upper bound on what removing non-matmul work can give, and
with it on MFU, which no eager change short of faster kernels can pass. No profiler: torch.profiler inflates
small element-wise ops several-fold (the 104M step's SwiGLU product: 8 ms profiled, 0.96 ms timed).

On a shared CPU every figure drifts with the neighbours' load (on one 2-core machine, within an hour: steps
5.0-6.8 s, the peak 0.140-0.189 TFLOP/s), so the script measures in rounds, in turns: the real step, the
replayed kernels, the square-matmul peak (bench/train_throughput.py's), and compares the best of each, since
a neighbour can only slow a run down. Every round is printed too.
"""
import argparse
import os
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


class RecordKernels(TorchDispatchMode):
    """Every call of a KERNELS operator: (operator, arguments with each tensor replaced by its layout)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in KERNELS:
            layout = lambda a: ("tensor", a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
            self.calls.append((func, [layout(a) for a in args], {k: layout(v) for k, v in (kwargs or {}).items()}))
        return func(*args, **(kwargs or {}))


def replay(calls, tensors):
    """Seconds the recorded calls take alone. Inputs are made before each call's clock starts, small random
    values (the attention backward's log-sum-exp included: its values do not change the work). Calls of one
    layout share their inputs, which may then sit in cache: if anything that flatters the kernels, as a bound
    should."""
    def make(a):
        if not (isinstance(a, tuple) and a and a[0] == "tensor"):
            return a
        if a not in tensors:
            tensors[a] = torch.empty_strided(a[1], a[2], dtype=a[3]).normal_(0, 0.1)
        return tensors[a]
    total = 0.0
    for func, args, kwargs in calls:
        args, kwargs = [make(a) for a in args], {k: make(v) for k, v in kwargs.items()}
        t = time.perf_counter()
        func(*args, **kwargs)
        total += time.perf_counter() - t
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--n_layers", type=int, default=16)
    ap.add_argument("--n_heads", type=int, default=8)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of (step, replay, peak), in turns")
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
    recorder = RecordKernels()
    with recorder:
        step()
    tensors = {}
    replay(recorder.calls, tensors)          # first touch of the replay's inputs, untimed
    steps, kernels, peaks = [], [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t)
        kernels.append(replay(recorder.calls, tensors))
        peaks.append(measured_matmul_peak(torch.device("cpu"), torch.float32))

    flops = (6 * model.num_parameters() + 12 * cfg.n_layers * cfg.dim * T) * B * T   # as train_throughput.py
    step_s, kernel_s, peak = min(steps), min(kernels), max(peaks)
    ms = lambda values: ", ".join(f"{v * 1000:,.0f}" for v in values)
    mfu = lambda seconds: f"{B * T / seconds:,.0f} tokens/s, MFU {100 * flops / seconds / peak:.1f}%"
    n_attention = sum(f.__name__.startswith("_scaled") for f, _, _ in recorder.calls)
    print(f"model        {model.num_parameters() / 1e6:.2f}M parameters, dim {cfg.dim}, {cfg.n_layers} layers, "
          f"seq {T}, batch {B}, float32, {torch.get_num_threads()} threads; best of {args.rounds} rounds")
    print(f"kernels      {len(recorder.calls)} calls per step ({n_attention} of them attention)")
    print(f"step         {step_s * 1000:,.1f} ms  ({mfu(step_s)})  rounds: {ms(steps)} ms")
    print(f"kernels only {kernel_s * 1000:,.1f} ms  ({mfu(kernel_s)}: the bound)  rounds: {ms(kernels)} ms")
    print(f"the rest     {(step_s - kernel_s) * 1000:,.1f} ms ({100 * (step_s - kernel_s) / step_s:.1f}% of the step)")
    print(f"peak         {peak / 1e12:.3f} TFLOP/s (square float32 matmul)  rounds: "
          f"{', '.join(f'{p / 1e12:.3f}' for p in peaks)}")

if __name__ == "__main__":
    main()

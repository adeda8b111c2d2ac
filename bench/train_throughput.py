"""Time training steps and print tokens/s, model FLOP/s, MFU and peak memory. Figures, not a test.

    python bench/train_throughput.py --dim 768 --n_layers 16 --max_seq_len 512 --batch_size 2 --steps 3
    python bench/train_throughput.py --dim 768 --n_layers 16 --batch_size 32 --dtype bfloat16 --compile  # GPU

Model FLOPs per token = 6 * N (forward 2N, backward 4N for the N parameters' matmuls; the tied embedding
matrix is counted once, as the output head) + 12 * n_layers * dim * T for attention's scores and weighted sum
(the estimate of the PaLM paper, appendix B). MFU = achieved model FLOP/s / peak FLOP/s, where the peak comes
from a table for known GPUs or, on CPU, from a matmul in the run's dtype measured here. Since nothing is padded in
pretraining, every token counted is a real one.
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from trainer.loop import make_optimizer  # noqa: E402
from trainer.losses import chunked_next_token_loss, next_token_loss  # noqa: E402
from trainer.precision import setup_precision  # noqa: E402
from trainer.setup import keep_freed_cpu_memory  # noqa: E402

# Dense (no sparsity) peak tensor FLOP/s by GPU name and dtype, from the vendors' data sheets.
GPU_PEAK = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},   # SXM; float32 means TF32
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 83e12},
}


def measured_matmul_peak(device, dtype, sizes=(1024, 3072), repeats=5):
    """Best FLOP/s of an n x n x n matmul over a few sizes: what this machine can do at best, for MFU on CPU.
    Several sizes, because one can hit a slow case of the library (on an AVX512-BF16 CPU, bfloat16 at
    n = 2048 ran at half the speed of n = 1024 or 3072)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(repeats + 1):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device, precision):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK.items():
            if key in name:
                return peaks[precision.name], f"{name} data sheet ({precision.name})"
        return measured_matmul_peak(device, precision.dtype, (8192,)), f"measured {precision.name} matmul on {name}"
    # The run's own dtype: under --dtype bfloat16 the matmuls run in bfloat16, whose peak is another number.
    return (measured_matmul_peak(device, precision.dtype),
            f"measured {precision.name} matmul, {torch.get_num_threads()} threads")


def add_shape_flags(ap):
    """The model and batch shape, the 104M one by default: the flags bench/compare.py passes to both revisions
    (keep their names), shared with bench/matmul_bound.py."""
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--n_layers", type=int, default=16)
    ap.add_argument("--n_heads", type=int, default=8)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_flags(ap)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup_steps", type=int, default=3,
                    help="untimed steps first (compile; allocation: on CPU at the 104M shape the 2nd and 3rd steps "
                         "still touch ~250k and ~30k fresh pages, the first use of memory the 1st step did not need)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--head_loss", choices=("chunked", "plain"), default="chunked",
                    help="chunked: head + cross-entropy in chunks (trainer/losses.py, what training uses); "
                         "plain: all the logits, then F.cross_entropy")
    ap.add_argument("--malloc_defaults", action="store_true",
                    help="CPU: leave glibc malloc's thresholds as they are, to measure what the training scripts' "
                         "keep_freed_cpu_memory (trainer/setup.py) saves")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = setup_precision(args.dtype, device)
    if device.type == "cpu" and not args.malloc_defaults:
        keep_freed_cpu_memory()     # as every stage script does (trainer/setup.py start)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      max_seq_len=args.max_seq_len)
    model = Transformer(cfg).to(device)
    n_params = model.num_parameters()
    optimizer = make_optimizer(model, 1e-4, 0.1, device)
    scaler = precision.grad_scaler()
    step_model = torch.compile(model) if args.compile else model
    T, B = args.max_seq_len, args.batch_size
    x = torch.randint(3, cfg.vocab_size, (B, T + 1), device=device)

    def train_step():
        with precision.autocast():
            if args.head_loss == "chunked":
                hidden = step_model(x[:, :-1], return_hidden=True)
                loss, n = chunked_next_token_loss(hidden, model.output.weight, x[:, 1:])
            else:
                logits = step_model(x[:, :-1])
        if args.head_loss == "plain":
            loss, n = next_token_loss(logits, x[:, 1:])
        scaler.scale(loss / n).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    # On a shared CPU the matmul peak drifts with the neighbours' load (0.147 to 0.172 TFLOP/s on one machine in
    # two sessions): it is measured before the warm-up and again after the timed steps, and MFU divides by the
    # higher of the two, so a slow moment of the peak measurement cannot flatter it.
    peak_before, _ = peak_flops(device, precision)
    for _ in range(args.warmup_steps):
        train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    sync(device)
    seconds = (time.perf_counter() - t0) / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps

    tokens_per_s = B * T / seconds
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.dim * T
    achieved = flops_per_token * tokens_per_s
    peak_after, peak_source = peak_flops(device, precision)
    peak = max(peak_before, peak_after)
    if device.type == "cpu":
        peak_source += f"; before {peak_before / 1e12:.3f}, after {peak_after / 1e12:.3f}, the higher"
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
    print(f"model        {n_params / 1e6:.2f}M parameters, dim {cfg.dim}, {cfg.n_layers} layers, seq {T}, batch {B}")
    print(f"device       {device} | {precision.describe()} | compile {args.compile} | head loss {args.head_loss}")
    print(f"step         {seconds * 1000:.1f} ms ({args.steps} timed steps after {args.warmup_steps} warm-up)")
    print(f"throughput   {tokens_per_s:,.0f} tokens/s")
    print(f"model FLOP/s {achieved / 1e12:.3f} TFLOP/s ({flops_per_token / 1e6:.1f} MFLOP/token)")
    print(f"peak         {peak / 1e12:.3f} TFLOP/s ({peak_source})")
    print(f"MFU          {100 * achieved / peak:.1f}%")
    print(f"peak memory  {memory}")
    print(f"page faults  {faults:,.0f} per step (minor: fresh pages touched; see trainer/setup.py keep_freed_cpu_memory)")


if __name__ == "__main__":
    main()

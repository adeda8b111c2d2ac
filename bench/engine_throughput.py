"""Greedy generation speed: one sequence at a time (model/generate.py) vs the batched engine (model/engine.py).
Figures, not a test. The weights are random (speed does not depend on their values) and </s> is switched off,
so every prompt gets exactly --max_new_tokens tokens; prompts have different lengths.

    python bench/engine_throughput.py                                    # tiny model, CPU
    python bench/engine_throughput.py --dim 512 --n_layers 8 --batch_sizes 1 8 32 --device cuda

It also checks that the batched tokens equal the one-at-a-time tokens (greedy), and says so.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from model.engine import generate_batch  # noqa: E402
from model.generate import generate  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16, help="how many prompts (lengths spread over 8..--max_prompt_len)")
    ap.add_argument("--max_prompt_len", type=int, default=64)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    model = Transformer(cfg).to(args.device).eval()
    lengths = torch.linspace(8, args.max_prompt_len, args.prompts).long().tolist()
    prompts = [torch.randint(3, cfg.vocab_size, (n,)).tolist() for n in lengths]
    context = args.max_prompt_len + args.max_new_tokens
    greedy = dict(max_new_tokens=args.max_new_tokens, temperature=0, eos_id=-1)
    total = args.prompts * args.max_new_tokens

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    print(f"model dim {args.dim}, {args.n_layers} layers ({model.num_parameters() / 1e6:.2f}M parameters) on "
          f"{args.device}, torch threads {torch.get_num_threads()}; {args.prompts} prompts of {lengths[0]}.."
          f"{lengths[-1]} tokens, {args.max_new_tokens} new tokens each (greedy)")
    generate_batch(model, prompts[:2], max_len=context, **{**greedy, "max_new_tokens": 4})  # warm-up
    alone, seconds = timed(lambda: [list(generate(model, p, **greedy)) for p in prompts])
    print(f"| {'how':<28} | {'seconds':>8} | {'tokens/s':>9} | {'speed-up':>8} | same tokens |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 11}|{'-' * 10}|-------------|")
    print(f"| {'generate, one at a time':<28} | {seconds:8.2f} | {total / seconds:9.1f} | {1.0:8.2f} | -           |")
    base = total / seconds
    for batch_size in args.batch_sizes:
        batched, seconds = timed(lambda: generate_batch(model, prompts, max_batch_size=batch_size, max_len=context,
                                                        **greedy))
        print(f"| {f'engine, max_batch_size {batch_size}':<28} | {seconds:8.2f} | {total / seconds:9.1f} | "
              f"{total / seconds / base:8.2f} | {'yes' if batched == alone else 'NO':<11} |")


if __name__ == "__main__":
    main()

"""SFT with and without --pack, side by side: useful (non-padding) tokens per second and the padding computed.
Figures, not a test.

    python bench/packing_throughput.py                        # the demo's SFT shape and data
    python bench/packing_throughput.py --dim 256 --n_layers 8 --rounds 5
    python bench/packing_throughput.py --dtype bfloat16      # under bfloat16 autocast, as --dtype bfloat16 trains

Both variants train the same model from the same weights on the same micro-batches of the batch plan (the
real loss function, backward and AdamW step); they run in turns (padded, packed, padded, ...) so a busy
neighbour slows both alike, and the median of the rounds is reported. Useful tokens are the conversations'
own tokens; everything else a row holds is padding. The padding share is also counted over --stat_batches
micro-batches (collation only, no model), a steadier figure than the few timed ones.
Every round replays the same batches: under --dtype bfloat16 the first round pays for oneDNN meeting each
matmul shape for the first time (5,927 vs 9,751-9,987 useful tokens/s in later rounds, demo shape), which a
training run, whose packed rows change length every step, pays all the time. The median hides it.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.chat import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from dataset.sampler import BatchPlan  # noqa: E402
from dataset.sft import SFTDataset, collate_sft  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from trainer.setup import keep_freed_cpu_memory  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from trainer.loop import make_optimizer  # noqa: E402
from trainer.losses import language_model_loss  # noqa: E402


def useful_tokens(batch):
    """Tokens of real samples in a batch (its input positions that are not padding)."""
    if "seq_lens" in batch:
        return sum(batch["seq_lens"])
    return int(sum(len(s["ids"]) - 1 for s in batch["samples"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", default="dataset/demo/sft_*.jsonl")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--max_seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each variant, in turns")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--stat_batches", type=int, default=300, help="micro-batches the padding share is counted on")
    args = ap.parse_args()
    keep_freed_cpu_memory()     # as the stage scripts do on CPU

    tokenizer = Tokenizer()
    data = SFTDataset(args.data_path, tokenizer, args.max_seq_len, DEFAULT_SYSTEM_PROMPT)
    plan = BatchPlan(len(data), args.batch_size, 1, 1, 0, seed=42)
    micro = plan.micro_batches(0)

    def collate(indices, pack):
        samples = [data[i] for i in indices]
        batch = collate_sft(samples, pack=pack)
        batch["samples"] = samples
        return batch

    for pack in (False, True):
        computed = useful = 0
        for indices in micro[:args.stat_batches]:
            batch = collate(indices, pack)
            computed += batch["input_ids"].numel()
            useful += useful_tokens(batch)
        print(f"{'packed' if pack else 'padded'}: over {min(len(micro), args.stat_batches)} micro-batches of "
              f"{args.batch_size}, {computed:,} tokens computed, {useful:,} useful, padding "
              f"{100 * (1 - useful / computed):.1f}%")

    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      max_seq_len=args.max_seq_len)
    torch.manual_seed(0)
    start = Transformer(cfg).state_dict()
    timed = [[collate(indices, pack) for indices in micro[1:1 + args.steps]] for pack in (False, True)]
    warm = [collate(micro[0], pack) for pack in (False, True)]
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")  # noqa: E731

    def run(pack):
        model = Transformer(cfg)
        model.load_state_dict(start)
        optimizer = make_optimizer(model, 1e-4, 0.1, torch.device("cpu"))

        def step(batch):
            loss, n, _ = language_model_loss(model, batch, autocast)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step(warm[pack])
        t = time.perf_counter()
        for batch in timed[pack]:
            step(batch)
        seconds = time.perf_counter() - t
        computed = sum(b["input_ids"].numel() for b in timed[pack])
        return sum(useful_tokens(b) for b in timed[pack]) / seconds, computed / seconds

    results = {False: [], True: []}
    for r in range(args.rounds):
        for pack in (False, True):
            results[pack].append(run(pack))
            print(f"round {r + 1}/{args.rounds} {'packed' if pack else 'padded'}: {results[pack][-1][0]:,.0f} useful "
                  f"tokens/s ({results[pack][-1][1]:,.0f} computed tokens/s)", flush=True)
    med = {pack: statistics.median(u for u, _ in results[pack]) for pack in results}
    med_computed = {pack: statistics.median(c for _, c in results[pack]) for pack in results}
    print(f"model {cfg.dim} dim, {cfg.n_layers} layers, seq {cfg.max_seq_len}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.dtype}")
    print(f"median useful tokens/s: padded {med[False]:,.0f}, packed {med[True]:,.0f}, ratio "
          f"{med[True] / med[False]:.2f}x")
    print(f"median computed tokens/s: padded {med_computed[False]:,.0f}, packed {med_computed[True]:,.0f} "
          f"(the cost per token of per-sample attention and of the shorter rows)")


if __name__ == "__main__":
    main()

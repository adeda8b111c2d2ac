"""Fewer, larger kernels: what model/model.py and trainer/losses.py fuse, and one fusion they do not. Figures, not a test.

    python bench/fusions.py                    # the demo shape and the 26M shape

- q, k, v projections: three matmuls vs one against the three weights stacked (Attention.project_qkv);
  forward + backward.
- SwiGLU's gate and up projections: two matmuls vs one stacked (not used: no gain measured).
- The head loss's element-wise work on one 1,024-token chunk of logits (ChunkedLMHeadLoss): log_softmax, the
  target's entry and exp for the gradient, vs softmax, two max-reductions and the identity
  log p_y = log p_max + z_y - z_max; forward only (it has no autograd: its gradient is softmax - onehot).
Timed in turns with bench/rope_norm.py's compare: the median of --repeats, and the outputs' largest difference.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.rope_norm import SHAPES, TABLE_HEADER, compare  # noqa: E402
from model import ModelConfig  # noqa: E402

CHUNK_TOKENS = 1024   # ChunkedLMHeadLoss's default chunk


def qkv_separate(x, wq, wk, wv):
    return torch.cat([F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)], dim=-1)


def qkv_stacked(x, wq, wk, wv):
    # split and cat again, as the separate side's cat: both pay for one copy of the output
    return torch.cat(F.linear(x, torch.cat([wq, wk, wv])).split([len(wq), len(wk), len(wv)], dim=-1), dim=-1)


def swiglu_separate(x, w1, w3):
    return F.silu(F.linear(x, w1)) * F.linear(x, w3)


def swiglu_stacked(x, w1, w3):
    gate, up = F.linear(x, torch.cat([w1, w3])).chunk(2, dim=-1)
    return F.silu(gate) * up


def head_log_softmax_exp(logits, targets):
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    probs = log_probs.exp_()
    return nll + probs[:, 0]                      # both results in the output, so neither is skipped


def head_softmax_max(logits, targets):
    probs = torch.softmax(logits, dim=-1)
    z_max, p_max = logits.amax(dim=-1), probs.amax(dim=-1)
    nll = -(p_max.log() + logits.gather(1, targets[:, None]).squeeze(1) - z_max)
    return nll + probs[:, 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print(TABLE_HEADER)
    for label, B, T, dim, heads in SHAPES:
        cfg = ModelConfig(dim=dim, n_heads=heads, n_kv_heads=2)
        x = torch.randn(B * T, dim)
        wq, wk, wv = (0.02 * torch.randn(n * cfg.head_dim, dim) for n in (heads, 2, 2))
        compare(f"q, k, v, {label} ({B * T}x{dim} -> {heads}+2+2 heads of {cfg.head_dim}): three matmuls, then one",
                qkv_separate, qkv_stacked, (x, wq, wk, wv), (True, True, True, True), args.repeats)
        w1, w3 = (0.02 * torch.randn(cfg.hidden_dim, dim) for _ in range(2))
        compare(f"SwiGLU gate + up, {label} ({B * T}x{dim} -> 2x{cfg.hidden_dim}): two matmuls, then one",
                swiglu_separate, swiglu_stacked, (x, w1, w3), (True, True, True), args.repeats)
    vocab = ModelConfig().vocab_size
    logits = 3 * torch.randn(CHUNK_TOKENS, vocab)
    targets = torch.randint(0, vocab, (CHUNK_TOKENS,))
    compare(f"head loss, one chunk ({CHUNK_TOKENS}x{vocab}): log_softmax + exp, then softmax + max identity",
            head_log_softmax_exp, head_softmax_max, (logits, targets), (False, False), args.repeats)


if __name__ == "__main__":
    main()

"""Fewer, larger kernels: what model/model.py and trainer/losses.py fuse, and what they do not. Figures, not a test.

    python bench/fusions.py                    # the demo shape and the 26M shape

- q, k, v projections: three matmuls vs one against the three weights stacked (Attention.project_qkv);
  forward + backward.
- SwiGLU's gate and up projections: two matmuls vs one stacked (not used: no gain measured).
- The head loss's element-wise work on one 1,024-token chunk of logits (ChunkedLMHeadLoss): log_softmax, the
  target's entry and exp for the gradient, vs softmax, two max-reductions and the identity
  log p_y = log p_max + z_y - z_max; forward only (it has no autograd: its gradient is softmax - onehot).
- Attention over packed SFT samples (--pack; 16 demo conversations, truncated to the shape's context): the
  samples first-fit into rows of the context length with a block-diagonal causal mask over each row (what
  --pack did before), vs all of them in one row with one causal kernel call per sample
  (model.packed_causal_attention); forward + backward. The first variant also pays the gather of q, k, v into
  its rows and back (a copy, small next to the attention).
- The same packed row, all samples padded to the longest in one (samples, H, L_max, hd) batch and ONE causal
  kernel call (not used: the kernel is bound by its FLOPs, and padding to the longest sample multiplies the
  sum of L^2 it computes), vs one call per sample.
- Causal attention over a batch (the pretraining step's): the math backend (q k^T, masked softmax, @ v as
  separate ops), then the fused kernel model/model.py calls; and, with the fused kernel both times, the GQA heads
  expanded as the model does (a copy of k and v per query head), then `enable_gqa=True` (no copy). The model
  keeps the copy: the gain is small (8-12% of attention, about 1.5% of the demo step), and no GPU run here has
  checked that every CUDA backend SDPA may pick under bf16 (cuDNN's among them) accepts grouped heads.
Timed in turns with bench/rope_norm.py's compare: the median of --repeats, and the outputs' largest difference.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.rope_norm import SHAPES, TABLE_HEADER, compare  # noqa: E402
from dataset.chat import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from dataset.sft import SFTDataset  # noqa: E402
from model import ModelConfig  # noqa: E402
from model.model import packed_causal_attention  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402

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


def first_fit_rows(lengths, capacity):
    """First-fit decreasing: each sample, longest first, into the first row with room; rows of sample indices."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def rows_attention(lengths, capacity):
    """Attention of one packed row (1, H, sum L, hd) computed the old way: gathered into first-fit rows of
    `capacity` tokens, one block-diagonal causal mask per row, and scattered back."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    rows = first_fit_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    gather = torch.zeros(len(rows), width, dtype=torch.long)        # token of the one-row layout at (r, t)
    sample = torch.full((len(rows), width), -1)                     # its sample; -1: padding
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            gather[r, t:t + lengths[i]] = torch.arange(starts[i], starts[i] + lengths[i])
            sample[r, t:t + lengths[i]] = i
            t += lengths[i]
    mask = (sample[:, :, None] == sample[:, None, :]) & torch.ones(width, width, dtype=torch.bool).tril()
    back = torch.empty(sum(lengths), dtype=torch.long)              # where each token of the one row went
    back[gather[sample >= 0]] = torch.arange(len(rows) * width).view(len(rows), width)[sample >= 0]

    def attention(q, k, v):
        H, hd = q.shape[1], q.shape[3]
        q, k, v = (x[0][:, gather].transpose(0, 1) for x in (q, k, v))          # (R, H, width, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return out.transpose(0, 1).reshape(H, -1, hd)[:, back][None]
    return attention


def padded_samples_attention(lengths):
    """Attention of one packed row (1, H, sum L, hd) with its samples padded into a batch of rows of the
    longest sample's length: one causal call, then the real positions back into the packed row (causal
    attention never lets a real position read the padding after it)."""
    width = max(lengths)
    slot = torch.cat([i * width + torch.arange(n) for i, n in enumerate(lengths)])   # packed token -> padded slot

    def attention(q, k, v):
        H, hd = q.shape[1], q.shape[3]
        q, k, v = (x[0].new_zeros(H, len(lengths) * width, hd).index_copy(1, slot, x[0])
                   .view(H, len(lengths), width, hd).transpose(0, 1) for x in (q, k, v))   # (samples, H, width, hd)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(0, 1).reshape(H, -1, hd).index_select(1, slot)[None]
    return attention


def causal_math_backend(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def causal_fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gqa_expanded(q, k, v):
    """model/model.py's Attention: each key/value head copied for the query heads that read it."""
    B, KV, T, hd = k.shape
    rep = q.shape[1] // KV
    k, v = (x[:, :, None].expand(B, KV, rep, T, hd).reshape(B, KV * rep, T, hd) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gqa_native(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


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
        data = SFTDataset("dataset/demo/sft_*.jsonl", Tokenizer(), T, DEFAULT_SYSTEM_PROMPT)
        picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:16].tolist()
        lengths = [len(data[i]["ids"]) - 1 for i in picks]
        q, k, v = (torch.randn(1, heads, sum(lengths), cfg.head_dim) for _ in range(3))
        compare(f"packed attention, {label} (16 demo conversations, {sum(lengths)} tokens, {heads} heads of "
                f"{cfg.head_dim}): mask over rows of {T}, then per sample", rows_attention(lengths, T),
                lambda q, k, v: packed_causal_attention(q, k, v, lengths), (q, k, v), (True, True, True),
                args.repeats)
        compare(f"packed attention, {label} (the same row): one padded call, then per sample",
                padded_samples_attention(lengths), lambda q, k, v: packed_causal_attention(q, k, v, lengths),
                (q, k, v), (True, True, True), args.repeats)
        q, k, v = (torch.randn(B, heads, T, cfg.head_dim) for _ in range(3))
        compare(f"causal attention, {label} ({B}x{heads}x{T}x{cfg.head_dim}): math backend, then fused kernel",
                causal_math_backend, causal_fused, (q, k, v), (True, True, True), args.repeats)
        k, v = (torch.randn(B, cfg.n_kv_heads, T, cfg.head_dim) for _ in range(2))
        compare(f"causal attention, {label} ({heads} query heads, {cfg.n_kv_heads} key/value heads): heads "
                f"expanded, then enable_gqa", gqa_expanded, gqa_native, (q, k, v), (True, True, True), args.repeats)
    vocab = ModelConfig().vocab_size
    logits = 3 * torch.randn(CHUNK_TOKENS, vocab)
    targets = torch.randint(0, vocab, (CHUNK_TOKENS,))
    compare(f"head loss, one chunk ({CHUNK_TOKENS}x{vocab}): log_softmax + exp, then softmax + max identity",
            head_log_softmax_exp, head_softmax_max, (logits, targets), (False, False), args.repeats)


if __name__ == "__main__":
    main()

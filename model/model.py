"""The whole transformer in one file: a Llama-style decoder (the architecture of MiniMind2).

    tokens -> embedding -> n_layers x [x + Attention(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> head

Pre-norm blocks, rotary position embeddings (RoPE), grouped-query attention (GQA), SwiGLU feed-forward, and an
output head tied to the embedding. Parameter names follow MiniMind2/Meta-Llama (tok_embeddings, attention.wq,
feed_forward.w1, ...) so the code is easy to compare with theirs.
"""
import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (https://arxiv.org/abs/1910.07467): LayerNorm without the mean and the bias.
    Computed in float32 even under bf16 autocast: the mean of squares is where low precision hurts."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(head_dim, length, theta, device=None):
    """cos and sin tables of shape (length, head_dim / 2) for rotary embeddings (https://arxiv.org/abs/2104.09864):
    entry (pos, i) is of the angle pos * theta^(-2i/head_dim), the rotation of pair i at position pos."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+d/2}) of x (B, heads, T, head_dim) by its position's angle:
        (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    The rotate-half layout of Hugging Face's Llama (dimension i is paired with i + d/2, not with i + 1).
    Written on the two halves, with half-width tables: forward + backward on CPU 1.2x (demo shape) to 2.7x
    (26M shape) as fast as the usual x * cos + rotate_half(x) * sin, whose rotate_half (a neg and a cat) and
    full-width tables move more data (python bench/rope_norm.py)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per layer, so decoding a new token
    costs attention over the cache instead of a forward over the whole prefix."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0          # number of positions filled (the same for every layer)
        self.max_len = max_len

    def update(self, layer, k, v):
        """Store this step's k, v (B, kv_heads, T, hd) for `layer`; return all keys and values so far."""
        start, end = self.pos, self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def packed_causal_attention(q, k, v, seq_lens, dropout_p=0.0):
    """Causal attention inside each sample of a packed row (dataset/packing.py), never across samples.
    q, k, v: (1, H, T, hd) with T = sum(seq_lens), the samples end to end. Each sample is one call of the
    fused causal kernel on its own slice: exactly the unpacked computation, and the work grows with the sum of
    L_i^2, not with T^2. Forward + backward on CPU, 16 demo conversations: 2.1x (demo width) and 3.5x (26M
    width) as fast as a block-diagonal causal mask over first-fit rows of the context length, which computes
    every (query, key) pair of a row and the padding at its end (python bench/fusions.py).
    On a GPU where FlashAttention's variable-length kernel runs (varlen_kernel_applies), the whole row is one
    call of it instead, since a loop of small kernel launches per sample and layer would cost more than they
    compute (varlen_causal_attention)."""
    if varlen_kernel_applies(q, dropout_p):
        return varlen_causal_attention(q, k, v, seq_lens)
    # split, not slicing: the backward of a split is one cat, while each slice's backward would write its
    # gradient into a zero tensor of the whole row's size and add them all up (O(samples x T)).
    outs = [F.scaled_dot_product_attention(q_i, k_i, v_i, dropout_p=dropout_p, is_causal=True)
            for q_i, k_i, v_i in zip(q.split(seq_lens, dim=2), k.split(seq_lens, dim=2), v.split(seq_lens, dim=2))]
    return torch.cat(outs, dim=2)


def varlen_kernel_applies(q, dropout_p):
    """Where torch.nn.attention.varlen.varlen_attn (FlashAttention-2's varlen kernel) runs: an NVIDIA GPU of
    compute capability 8.0+ (Ampere, Hopper, ...) in a build with FlashAttention, float16/bfloat16 inputs (bf16
    autocast), head sizes up to 256 in multiples of 8, and no attention dropout (the function takes no
    dropout_p). ROCm builds keep the per-sample loop: their varlen kernel supports only some AMD GPUs."""
    return (q.is_cuda and torch.version.hip is None and q.dtype in (torch.float16, torch.bfloat16)
            and dropout_p == 0.0 and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


@functools.lru_cache(maxsize=1)
def cumulative_lengths(seq_lens, device):
    """[0, L_0, L_0 + L_1, ..., T] as int32 on `device`: where each sample starts and ends in the row, the
    form varlen kernels take the lengths in. Cached, so the n_layers calls of one forward copy it to the GPU once
    (each copy from pageable memory waits for the GPU). Built outside inference mode: a tensor made under
    torch.inference_mode could not be saved for a later backward pass that hits the cache."""
    with torch.inference_mode(False):
        return torch.tensor([0, *itertools.accumulate(seq_lens)], dtype=torch.int32, device=device)


def varlen_causal_attention(q, k, v, seq_lens):
    """packed_causal_attention in one kernel call: varlen_attn takes the samples' tokens end to end as
    (T, heads, hd) and their boundaries as cumulative lengths; window (-1, 0) = causal (no key after the
    query), inside each sample only. q, k, v: (1, H, T, hd) views; the result is again (1, H, T, hd).
    Covered on CPU only with the kernel faked (tests/test_cuda_paths.py): no GPU has run this yet."""
    from torch.nn.attention import varlen    # here, not at the top: it loads torch._dynamo (~2 s at import)
    cu = cumulative_lengths(tuple(seq_lens), q.device)
    longest = max(seq_lens)
    out = varlen.varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                             longest, longest, window_size=(-1, 0))
    return out.transpose(0, 1)[None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def project_qkv(self, x):
        """x @ wq^T, x @ wk^T, x @ wv^T as ONE matmul against the three matrices stacked: one wider matmul
        instead of three narrow ones. On CPU the gain is small and depends on the hour: forward + backward of
        the projections 1.05-1.10x at the 26M shape; at the demo shape 1.27x one day, 0.80-0.86x another, with
        the whole training step equal within noise (python bench/fusions.py). The weights stay three
        parameters, named as in MiniMind2's checkpoints. LoRA-wrapped projections (model/lora.py) add their own
        low-rank terms: called one by one."""
        if not all(type(m) is nn.Linear for m in (self.wq, self.wk, self.wv)):
            return self.wq(x), self.wk(x), self.wv(x)
        qkv = F.linear(x, torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]))
        return qkv.split([self.wq.out_features, self.wk.out_features, self.wv.out_features], dim=-1)

    def forward(self, x, cos, sin, cache=None, attn_mask=None, seq_lens=None):
        """attn_mask: None (causal, positions continue after the cache), or a bool (B, T, S) tensor, True where
        query t of row b may read key slot s: the batched engine (model/engine.py) gives each row its own
        positions and keeps rows from reading each other's padding with it.
        seq_lens: the lengths of the samples of a packed row (--pack): causal attention inside each one."""
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, KV, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        past = 0
        if cache is not None:
            if attn_mask is None:
                past = cache.pos
            k, v = cache.update(self.layer_id, k, v)

        # GQA: each group of n_heads / n_kv_heads query heads reads the same key/value head. expand() makes
        # a view; reshape copies it into the layout scaled_dot_product_attention expects.
        if self.n_kv_heads != self.n_heads:
            rep, S = self.n_heads // self.n_kv_heads, k.shape[2]
            k = k[:, :, None].expand(B, self.n_kv_heads, rep, S, self.head_dim).reshape(B, self.n_heads, S, self.head_dim)
            v = v[:, :, None].expand(B, self.n_kv_heads, rep, S, self.head_dim).reshape(B, self.n_heads, S, self.head_dim)

        dropout_p = self.dropout if self.training else 0.0
        if seq_lens is not None:
            out = packed_causal_attention(q, k, v, seq_lens, dropout_p)
        elif attn_mask is not None:
            # The caller says which keys each query sees; one mask for all heads of a row.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None], dropout_p=dropout_p)
        elif past == 0:
            # The usual case (training, or the prompt at chat time): causal attention, fused kernel, no mask.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # One new token attends to every cached position: no mask needed.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # Several new tokens after a cached prefix: new token i sees the prefix and new tokens <= i.
            # (is_causal would align the triangle to the top-left corner, which is wrong here.)
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (https://arxiv.org/abs/2002.05202)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)   # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)   # up
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

        # Activation checkpointing (--grad_checkpointing, https://arxiv.org/abs/1604.06174): keep only the
        # block's input for the backward pass and run the block's forward again there. Memory for activations
        # drops from n_layers blocks' worth to one block's (plus each block's input), for ~1/3 more compute.
        self.grad_checkpointing = False

    def forward(self, x, cos, sin, cache=None, attn_mask=None, seq_lens=None):
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Non-reentrant: works with FSDP2 and with inputs that need no grad; the RNG state is saved and
            # restored, so dropout masks are the same in the recomputation and the result is bit-identical.
            return checkpoint(self._forward, x, cos, sin, cache, attn_mask, seq_lens, use_reentrant=False)
        return self._forward(x, cos, sin, cache, attn_mask, seq_lens)

    def _forward(self, x, cos, sin, cache=None, attn_mask=None, seq_lens=None):
        # Pre-norm: the residual stream x is never normalised in place, so gradients flow straight through.
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, attn_mask, seq_lens)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            # One matrix both reads tokens in and scores them out: saves vocab*dim parameters (4.9M of the
            # 104M model) and works well for small models.
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        """GPT-2's initialisation, in one place: every matrix ~ N(0, 0.02); the two projections that write
        into the residual stream (attention.wo, feed_forward.w2) are scaled down by 1/sqrt(2 * n_layers), so
        the stream's variance stays ~constant however deep the model is; norms start at 1."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def set_grad_checkpointing(self, enabled):
        """Recompute each block's activations in the backward pass instead of storing them (see the block)."""
        for layer in self.layers:
            layer.grad_checkpointing = enabled

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())  # parameters() counts the tied matrix once

    def forward(self, input_ids, cache=None, positions=None, attn_mask=None, seq_lens=None, return_hidden=False):
        """input_ids (B, T) -> logits (B, T, vocab). With a KVCache, positions continue after the cache.

        positions (B, T), with attn_mask (B, T, S) (see Attention.forward): each row's own positions, for a
        batch whose rows are at different lengths (model/engine.py; its cache writes each row at its
        positions). The cache's `pos` is then left alone: the caller keeps the per-row lengths.
        seq_lens: a packed row (--pack, dataset/packing.py): input_ids is (1, sum(seq_lens)), samples of these
        lengths end to end; each attends only to itself and its positions start at 0.
        return_hidden: the final normed hidden states (B, T, dim) instead, for a head other than the LM head
        (the reward model's and the critic's scalar head, model/heads.py)."""
        B, T = input_ids.shape
        if (positions is None) != (attn_mask is None):
            raise ValueError("positions and attn_mask go together: per-row positions need a mask saying which keys each row reads")
        if seq_lens is not None:
            if B != 1 or sum(seq_lens) != T or cache is not None or positions is not None:
                raise ValueError(f"seq_lens is for one packed row without a cache: got {B} rows of {T} tokens, "
                                 f"seq_lens summing to {sum(seq_lens)}")
            lengths = torch.tensor(seq_lens)
            first = (lengths.cumsum(0) - lengths).repeat_interleave(lengths)     # each token's sample start
            positions = (torch.arange(T) - first)[None].to(input_ids.device)
        if positions is None:
            start = cache.pos if cache is not None else 0
            end = start + T
        else:
            end = max(seq_lens) if seq_lens is not None else int(positions.max()) + 1
        if end > self.rope_cos.shape[0]:  # longer than any context seen so far: extend the tables
            cos, sin = rope_tables(self.cfg.head_dim, 2 * end, self.cfg.rope_theta, input_ids.device)
            self.rope_cos, self.rope_sin = cos, sin
        if positions is None:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]  # float32 tables
        else:
            # Row b's token t is rotated by the angle of its own position; (B, 1, T, hd) broadcasts over heads.
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        x = self.dropout(self.tok_embeddings(input_ids))
        for layer in self.layers:
            x = layer(x, cos, sin, cache, attn_mask, seq_lens)
        if cache is not None and positions is None:
            cache.pos += T
        hidden = self.norm(x)
        return hidden if return_hidden else self.output(hidden)

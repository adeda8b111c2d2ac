"""The transformer: size, causality, attention variants, KV cache, generation."""
import math

import pytest
import torch
import torch.nn.functional as F

from model import KVCache, ModelConfig, Transformer
from model.generate import generate
from model.model import apply_rope, rope_tables


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32, **kw})
    return Transformer(cfg).eval()


def count_by_formula(dim, n_layers, n_heads, n_kv_heads, vocab, hidden):
    head_dim = dim // n_heads
    attention = 2 * dim * dim + 2 * dim * n_kv_heads * head_dim        # wq, wo + wk, wv
    ffn = 3 * dim * hidden
    return n_layers * (attention + ffn + 2 * dim) + vocab * dim + dim    # + 2 norms/layer, tied embedding, final norm


def test_104m_parameter_count():
    cfg = ModelConfig(dim=768, n_layers=16)
    assert cfg.hidden_dim == 2048  # 8/3 * 768 = 2048, already a multiple of 64
    with torch.device("meta"):
        model = Transformer(cfg)
    n = model.num_parameters()
    assert n == count_by_formula(768, 16, 8, 2, 6400, 2048) == 104_030_976
    assert f"{n / 1e6:.2f}M" == "104.03M"


def test_hidden_dim_rule():
    assert ModelConfig(dim=512).hidden_dim == 1408   # MiniMind2's 26M model: 1365.3 rounded up
    assert ModelConfig(dim=64).hidden_dim == 192
    assert ModelConfig(dim=96, n_heads=4).hidden_dim == 256   # 256.0 exactly
    assert ModelConfig(dim=104, n_heads=4).hidden_dim == 320  # 277.3 -> 320
    assert ModelConfig(dim=64, hidden_dim=100).hidden_dim == 100


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_causality():
    model = tiny()
    x = torch.randint(3, 6400, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(3, 6400, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def reference_attention_model(model, x):
    """An independent forward pass: plain multi-head attention with an explicit softmax and causal mask,
    RoPE by complex-free formula, kv heads repeated by index. Uses the model's weights."""
    cfg = model.cfg
    B, T = x.shape
    h = model.tok_embeddings.weight[x]
    pos = torch.arange(T, dtype=torch.float32)
    half = cfg.head_dim // 2
    freqs = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float32) * 2 / cfg.head_dim)
    ang = pos[:, None] * freqs[None]                                    # (T, half)

    def rope(v):  # v (B, heads, T, hd): rotate (v_i, v_{i+half}) by ang_i
        a, b = v[..., :half], v[..., half:]
        return torch.cat([a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()], -1)

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.norm_eps) * w

    for layer in model.layers:
        att = layer.attention
        n = rms(h, layer.attention_norm.weight)
        q = (n @ att.wq.weight.T).view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = (n @ att.wk.weight.T).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = (n @ att.wv.weight.T).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        group = torch.arange(cfg.n_heads) // (cfg.n_heads // cfg.n_kv_heads)
        k, v = rope(k)[:, group], v[:, group]
        q = rope(q)
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, cfg.dim)
        h = h + out @ att.wo.weight.T
        n = rms(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + (F.silu(n @ ff.w1.weight.T) * (n @ ff.w3.weight.T)) @ ff.w2.weight.T
    return rms(h, model.norm.weight) @ model.tok_embeddings.weight.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_matches_reference_implementation(n_kv_heads):
    """n_kv_heads == n_heads is plain multi-head attention; fewer kv heads is GQA."""
    model = tiny(n_kv_heads=n_kv_heads)
    x = torch.randint(3, 6400, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_attention_model(model, x), atol=1e-4, rtol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(16, 40, 1e6)
    q, k = torch.randn(16), torch.randn(16)
    def score(i, j):
        return (apply_rope(q.view(1, 1, 1, 16), cos[i:i + 1], sin[i:i + 1]) *
                apply_rope(k.view(1, 1, 1, 16), cos[j:j + 1], sin[j:j + 1])).sum()
    torch.testing.assert_close(score(5, 2), score(35, 32), atol=1e-4, rtol=1e-4)


def test_kv_cache_gives_full_forward_logits():
    model = tiny()
    x = torch.randint(3, 6400, (1, 20))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 1, 20, "cpu", torch.float32)
        pieces = [model(x[:, :7], cache=cache), model(x[:, 7:12], cache=cache)]  # prefill, then a chunk
        pieces += [model(x[:, t:t + 1], cache=cache) for t in range(12, 20)]     # then one at a time
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_generation_with_and_without_cache_is_identical():
    model = tiny()
    prompt = [1, 100, 200, 300]
    with_cache = list(generate(model, prompt, max_new_tokens=20, temperature=0, eos_id=-1))
    without = list(generate(model, prompt, max_new_tokens=20, temperature=0, eos_id=-1, use_cache=False))
    assert len(with_cache) == 20 and with_cache == without


def test_generation_stops_at_eos_and_counts_new_tokens_only():
    model = tiny()
    with torch.no_grad():
        model.output.weight[2] += 100.0  # make </s> the most likely token everywhere (tied: embedding too)
    out = list(generate(model, [1] * 30, max_new_tokens=5, temperature=0))
    assert out == [2]
    with torch.no_grad():
        model.output.weight[2] -= 200.0
    assert len(list(generate(model, [1] * 30, max_new_tokens=5, temperature=0))) == 5


def test_sampling_filters():
    from model.generate import sample_next
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, None, temperature=1.0, top_k=2, generator=g) for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample_next(logits, None, temperature=1.0, top_p=0.5, generator=g) for _ in range(200)}
    assert picks == {0}   # p(0) = 0.67 >= 0.5 already
    # repetition penalty: a seen token with a positive logit is divided, so greedy moves to the next one
    assert sample_next(torch.tensor([2.0, 1.5]), [0], temperature=0, repetition_penalty=2.0) == 1


def test_grad_checkpointing_same_gradients_less_saved():
    """--grad_checkpointing recomputes each block in the backward pass: the gradients are bit-identical (dropout
    included: the RNG state is replayed), and far fewer activation bytes are kept between forward and backward."""
    def run(checkpointing):
        model = tiny(dropout=0.1, n_layers=4, vocab_size=256).train()   # a small head: the blocks dominate
        model.set_grad_checkpointing(checkpointing)
        ids = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
        saved = []
        torch.manual_seed(123)   # the dropout masks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = F.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)

    loss, grads, saved = run(False)
    loss_ckpt, grads_ckpt, saved_ckpt = run(True)
    assert loss_ckpt == loss
    for name in grads:
        assert torch.equal(grads_ckpt[name], grads[name]), name
    # Without checkpointing every block's internals are kept; with it, each block keeps little more than its input
    # (the logits and the head's inputs are the same in both).
    print(f"saved for backward: {saved:,} bytes -> {saved_ckpt:,} with checkpointing")
    assert saved_ckpt < 0.25 * saved, (saved_ckpt, saved)

"""bench/matmul_bound.py's bound is only a bound if its timer sees every matmul of a training step."""
import time

import torch

from bench.matmul_bound import TimeKernels
from model import ModelConfig, Transformer
from trainer.losses import chunked_next_token_loss


def test_timer_sees_every_matmul_of_a_step():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, vocab_size=300)
    model = Transformer(cfg)
    assert cfg.tie_word_embeddings      # else the embedding would be a 2-D weight that no matmul uses
    x = torch.randint(3, cfg.vocab_size, (3, 33))
    timer = TimeKernels()
    with timer:
        t = time.perf_counter()
        loss, n = chunked_next_token_loss(model(x[:, :-1], return_hidden=True), model.output.weight, x[:, 1:])
        (loss / n).backward()
        wall = time.perf_counter() - t
    # Every weight matrix (the tied head once) costs 2 FLOPs per entry and token forward, 4 backward
    # (dL/dx and dL/dW); the embedding's lookup is no matmul.
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    tokens = 3 * 32
    mm_flops = sum(2 * shapes[0][0] * shapes[0][1] * shapes[1][1]
                   for func, shapes, _ in timer.calls if func is torch.ops.aten.mm.default)
    assert mm_flops == 6 * matrices * tokens
    attention = [f.__name__ for f, _, _ in timer.calls if f.__name__.startswith("_scaled_dot_product")]
    assert len(attention) == 2 * cfg.n_layers            # a forward and a backward call per layer
    assert 0 < timer.seconds < wall                     # the kernels' time is part of the step's

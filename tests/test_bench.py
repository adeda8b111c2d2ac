"""bench/matmul_bound.py's bound is only a bound if its recorder sees every matmul of a training step."""
import torch

from bench.matmul_bound import RecordKernels, replay
from model import ModelConfig, Transformer
from trainer.losses import chunked_next_token_loss


def test_recorder_sees_every_matmul_of_a_step():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, vocab_size=300)
    model = Transformer(cfg)
    x = torch.randint(3, cfg.vocab_size, (3, 33))
    recorder = RecordKernels()
    with recorder:
        loss, n = chunked_next_token_loss(model(x[:, :-1], return_hidden=True), model.output.weight, x[:, 1:])
        (loss / n).backward()
    # Every weight matrix (the tied head once) costs 2 FLOPs per entry and token forward, 4 backward
    # (dL/dx and dL/dW); the embedding's lookup is no matmul.
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2)
    tokens = 3 * 32
    mm_flops = 0
    for func, args, _ in recorder.calls:
        if func is torch.ops.aten.mm.default:
            (m, k), (_, n_cols) = args[0][1], args[1][1]
            mm_flops += 2 * m * k * n_cols
    assert mm_flops == 6 * matrices * tokens
    attention = [f.__name__ for f, _, _ in recorder.calls if f.__name__.startswith("_scaled_dot_product")]
    assert len(attention) == 2 * cfg.n_layers            # a forward and a backward call per layer
    assert replay(recorder.calls, {}) > 0                # each call rebuilds from its recorded layouts and runs

"""The chunked LM head + cross-entropy (trainer/losses.py ChunkedLMHeadLoss) against the plain path: all the
logits, F.cross_entropy, autograd. Same loss, same gradients (float32, 1e-5)."""
import pytest
import torch

from dataset.chat import DEFAULT_SYSTEM_PROMPT
from dataset.sft import SFTDataset, collate_sft
from model import ModelConfig, Transformer
from model.tokenizer import Tokenizer
from trainer.losses import chunked_next_token_loss, language_model_loss, next_token_loss

TOL = 1e-5


def no_autocast():
    return torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_tokens", [7, 64, 10_000])   # uneven last chunk, several chunks, one chunk
def test_chunked_equals_plain_cross_entropy(masked, chunk_tokens):
    torch.manual_seed(0)
    B, T, dim, vocab = 3, 41, 32, 500
    hidden = torch.randn(B, T, dim, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, dim)).requires_grad_()
    targets = torch.randint(0, vocab, (B, T))
    mask = (torch.rand(B, T) < 0.6).long() if masked else None
    # The plain path, written out independently: log_softmax of all the logits, the target's entry.
    logits = hidden @ weight.t()
    per_token = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    plain = (per_token * (mask if masked else 1)).sum()
    n_plain = int(mask.sum()) if masked else B * T
    grads_plain = torch.autograd.grad(plain / n_plain, (hidden, weight))
    chunked, n = chunked_next_token_loss(hidden, weight, targets, mask, chunk_tokens=chunk_tokens)
    grads_chunked = torch.autograd.grad(chunked / n, (hidden, weight))
    assert n == n_plain
    assert abs(chunked.item() / n - plain.item() / n_plain) < TOL
    for a, b in zip(grads_plain, grads_chunked):
        assert (a - b).abs().max() < TOL
    if masked:  # a masked-out token gets no gradient at all
        assert (grads_chunked[0][mask == 0] == 0).all()


def test_target_far_below_the_max_logit():
    """-log p_y is taken as z_max - z_y - log p_max: exact where p_y itself underflows to 0 in float32
    (a target logit 87+ below the largest), which a -log(softmax) would turn into inf."""
    logits = torch.tensor([[120.0, 0, 0, 0], [0, 5, 0, 0], [1, 2, 3, 4], [0, 0, -3, 0]])   # 4 tokens x 4 words
    hidden, weight = torch.eye(4), logits.t().contiguous().requires_grad_()                 # hidden @ weight^T
    targets = torch.tensor([1, 1, 3, 2])                       # token 0's target is 120 below its max logit
    loss, n = chunked_next_token_loss(hidden[None], weight, targets[None], chunk_tokens=3)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    assert torch.isfinite(loss) and expected.item() > 120
    assert abs(loss.item() - expected.item()) < TOL * expected.item()


def test_no_grad_computes_the_loss_only():
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(2, 9, 8), torch.randn(50, 8), torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        loss, n = chunked_next_token_loss(hidden, weight, targets, chunk_tokens=4)
    assert abs(loss.item() - next_token_loss(hidden @ weight.t(), targets)[0].item()) < TOL * n


def test_model_gradients_equal_the_plain_path():
    """Through the whole model with the tied head: every parameter's gradient, on real SFT conversations
    (masked, padded) and on a pretraining-style batch (no mask)."""
    tokenizer = Tokenizer()
    data = SFTDataset("dataset/demo/sft_identity.jsonl", tokenizer, 96, DEFAULT_SYSTEM_PROMPT)
    sft_batch = collate_sft([data[i] for i in range(6)])
    torch.manual_seed(1)
    ids = torch.randint(3, 6400, (2, 65))
    pretrain_batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96))
    for batch in (sft_batch, pretrain_batch):
        model.zero_grad()
        logits = model(batch["input_ids"])
        plain, n_plain = next_token_loss(logits, batch["targets"], batch.get("loss_mask"))
        (plain / n_plain).backward()
        grads_plain = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        chunked, n, _ = language_model_loss(model, batch, no_autocast)
        (chunked / n).backward()
        assert n == n_plain
        assert abs(chunked.item() / n - plain.item() / n_plain) < TOL
        for k, p in model.named_parameters():
            assert (p.grad - grads_plain[k]).abs().max() < TOL, k


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk_tokens", [7, 10_000])
def test_chunked_sequence_logps_equal_the_plain_ones(packed, chunk_tokens):
    """DPO's per-sequence log-prob sums, chunked (the backward pass recomputes each chunk's logits) against
    log_softmax over all the logits written out here: values and gradients, with a different weight per
    sequence as the DPO loss gives them."""
    from trainer.losses import chunked_sequence_logps
    torch.manual_seed(1)
    B, T, dim, vocab = 4, 29, 24, 300
    if packed:   # one row of 5 sequences end to end (dataset/packing.py), of 9, 30, 1, 40 and 36 tokens
        B, T = 1, B * T
    hidden = torch.randn(B, T, dim, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, dim)).requires_grad_()
    targets = torch.randint(0, vocab, (B, T))
    mask = (torch.rand(B, T) < 0.7).float()
    token_logps = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    if packed:
        seq_lens = [9, 30, 1, 40, 36]
        seq_ids = torch.repeat_interleave(torch.arange(5), torch.tensor(seq_lens))[None]   # the reference's own
        plain = torch.stack([(token_logps * mask)[seq_ids == i].sum() for i in range(5)])
    else:
        seq_lens = None
        plain = (token_logps * mask).sum(-1)
    chunked = chunked_sequence_logps(hidden, weight, targets, mask, seq_lens, chunk_tokens=chunk_tokens)
    assert (chunked - plain).abs().max() < TOL * plain.abs().max()
    per_sequence_weight = torch.linspace(-2, 3, len(plain))
    grads_plain = torch.autograd.grad((plain * per_sequence_weight).sum(), (hidden, weight))
    grads_chunked = torch.autograd.grad((chunked * per_sequence_weight).sum(), (hidden, weight))
    for a, b in zip(grads_plain, grads_chunked):
        assert (a - b).abs().max() < TOL * a.abs().max()


def test_evaluation_runs_only_the_heads_forward_matmul():
    """Under no_grad (held-out evaluation) the chunked head computes the logits and the loss only: one
    (N x dim) @ (dim x vocab) matmul, not the two gradient matmuls its training forward adds (counted by
    PyTorch's FLOP counter), and the same loss."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    N, dim, vocab = 12, 8, 50
    hidden, targets = torch.randn(1, N, dim), torch.randint(0, vocab, (1, N))
    weight = torch.randn(vocab, dim, requires_grad=True)
    with FlopCounterMode(display=False) as training:
        loss_train, _ = chunked_next_token_loss(hidden, weight, targets, chunk_tokens=5)
    with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
        loss_eval, _ = chunked_next_token_loss(hidden, weight, targets, chunk_tokens=5)
    assert evaluation.get_total_flops() == 2 * N * dim * vocab
    assert training.get_total_flops() == 3 * evaluation.get_total_flops()
    assert torch.equal(loss_eval, loss_train.detach())

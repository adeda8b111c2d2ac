"""Every loss of the codebase, in one file.

Notation: a sequence x_1..x_T; the model gives logits z_t over the vocabulary at each position t, and
log p(x_{t+1} | x_<=t) = log_softmax(z_t)[x_{t+1}]. Losses are returned as SUMS with the number of terms, so
the training loop can average over the whole global batch (all micro-batches and all ranks) exactly.
"""
import torch
import torch.nn.functional as F


def next_token_loss(logits, targets, loss_mask=None):
    """Cross-entropy of predicting each next token: L = -sum_t m_t log p(x_{t+1} | x_<=t), with the mask m_t.

    logits (B, T, V) at positions 1..T; targets (B, T) are the tokens at positions 2..T+1 (the inputs shifted
    by one); loss_mask (B, T) is 1 where the target is supervised (pretraining: everywhere; SFT: assistant
    answers only). Returns (sum of the per-token losses, number of supervised tokens).
    Computed in float32: log_softmax over 6400 classes in bf16 loses too many digits."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    if loss_mask is None:
        return per_token.sum(), targets.numel()
    mask = loss_mask.flatten().float()
    return (per_token * mask).sum(), int(mask.sum().item())


def language_model_loss(model, batch, autocast):
    """The stage loss of pretraining and SFT, in the shape the training loop expects:
    (loss sum, number of supervised tokens, extra metric sums). Pretraining batches carry no loss_mask
    (every token is a target); SFT batches mask everything but the assistant's answers."""
    with autocast():
        logits = model(batch["input_ids"])
    loss_sum, n_tokens = next_token_loss(logits, batch["targets"], batch.get("loss_mask"))
    return loss_sum, n_tokens, {}

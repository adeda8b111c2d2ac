"""Every loss of the codebase, in one file.

Notation: a sequence x_1..x_T; the model gives logits z_t over the vocabulary at each position t, and
log p(x_{t+1} | x_<=t) = log_softmax(z_t)[x_{t+1}]. The training loop takes SUMS of per-term losses with the
number of terms, so it can average over the whole global batch (all micro-batches, all ranks) exactly.

Contents: next_token_loss (pretraining, SFT), sequence_logps and dpo_loss (DPO, https://arxiv.org/abs/2305.18290).
"""
import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")
LABEL_SMOOTHING_TYPES = ("sigmoid", "robust", "sigmoid_norm")   # the losses that model label noise


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


def sequence_logps(logits, targets, loss_mask):
    """log pi(y | x) of each sequence's completion: the SUM over completion tokens of log p(token), in float32.

    This is the DPO paper's (and TRL's) definition: a sum, not a length-average. Averaging (MiniMind2's
    choice) shrinks the log-ratio by the answer length, so with beta 0.1 the loss hardly moves off ln 2.
    logits (N, T, V) aligned with targets (N, T) (position t predicts targets[:, t]); loss_mask (N, T) is 1
    on completion tokens. Returns (N,)."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)      # log p(target_t) at every t
    return (token_logps * loss_mask).sum(-1)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None):
    """Per-pair DPO losses and implicit rewards. All inputs are (B,) sequence log-probs (sums over completion
    tokens); lengths (B,) are completion token counts, needed by the length-normalised types.

    The implicit reward of an answer is r = beta * (log pi(y|x) - log pi_ref(y|x)): how much more likely the
    policy made it than the frozen reference did. DPO's loss (paper, eq. 7) pushes the chosen answer's reward
    above the rejected one's:
        h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l))    # the margin, before beta
        sigmoid:      -log sigmoid(beta * h)                                     # eq. 7
                      with label_smoothing eps > 0 (conservative DPO, https://ericmitchell.ai/cdpo.pdf:
                      each label is wrong with probability eps), as TRL does:
                      -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        robust:       label noise eps = label_smoothing (https://arxiv.org/abs/2403.00409), unbiased:
                      (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
        hinge:        max(0, 1 - beta * h)                                       # SLiC (arXiv:2305.10425)
        ipo:          (h_avg - 1 / (2 beta))^2 with per-token AVERAGE log-probs  # IPO (arXiv:2310.12036)
        sigmoid_norm: -log sigmoid(beta * h_avg), h from per-token averages (MiniMind2's choice, to compare);
                      label smoothing as for sigmoid
    hinge and ipo have no label smoothing (TRL ignores it there; we refuse it rather than ignore it).
    Returns (losses, chosen_rewards, rejected_rewards), each (B,). Rewards always use the summed log-probs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if label_smoothing and loss_type not in LABEL_SMOOTHING_TYPES:
        raise ValueError(f"label_smoothing applies to {LABEL_SMOOTHING_TYPES}, not to loss_type {loss_type!r}")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps          # log pi/pi_ref for y_w
    rejected_logratio = policy_rejected_logps - ref_rejected_logps    # ... for y_l
    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {loss_type} needs chosen_lengths and rejected_lengths")
        h = chosen_logratio / chosen_lengths - rejected_logratio / rejected_lengths
    else:
        h = chosen_logratio - rejected_logratio

    eps = label_smoothing
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo: regress the margin onto 1/(2 beta) instead of pushing it to infinity
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * chosen_logratio.detach()
    rejected_rewards = beta * rejected_logratio.detach()
    return losses, chosen_rewards, rejected_rewards

"""Every loss of the codebase, in one file.

Notation: a sequence x_1..x_T; the model gives logits z_t over the vocabulary at each position t, and
log p(x_{t+1} | x_<=t) = log_softmax(z_t)[x_{t+1}]. The training loop takes SUMS of per-term losses with the
number of terms, so it can average over the whole global batch (all micro-batches, all ranks) exactly.

Contents: next_token_loss and its chunked twin (pretraining, SFT), sequence_logps and its chunked twin, and
dpo_loss (DPO, https://arxiv.org/abs/2305.18290); token_logps_and_entropy (the per-token inputs of PPO and
GRPO); the reward model's pairwise loss; the KL estimators k1/k2/k3; PPO's rollout processing, GAE, whitening
and clipped policy/value losses; GRPO's group advantages, per-token losses and their aggregations. The RL parts
follow Hugging Face TRL (reward model and GRPO: 1.16; PPO: 1.12, its last release with PPO) number for number:
tests/test_rl_losses.py checks them against TRL's own outputs (tests/data/*_trl.json).
"""
import math

import torch
import torch.nn.functional as F

from dataset.packing import model_inputs, per_sequence_sum
from trainer.checkpoint import unwrap
from trainer.fsdp import is_sharded

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


class ChunkedLMHeadLoss(torch.autograd.Function):
    """sum_t cross_entropy(h_t W^T, y_t) over the given (supervised) positions, the LM head and its loss in one,
    computed chunk by chunk.

    The plain path (model -> logits -> next_token_loss) holds the (tokens x vocab) logits, their float32
    copy, the log-softmax and, in the backward pass, a gradient of each: for the demo batch (16 x 256 tokens,
    6,400 words) that is 105 MB per (tokens x vocab) float32 tensor, more than the rest of the model's
    activations. Here only one chunk of `chunk_tokens` rows of logits exists at a time, and the gradients
    with respect to h and W are computed right away from it (softmax - one-hot, the derivative of
    cross-entropy), so the backward pass only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        # hidden (N, dim), weight (vocab, dim), targets (N,): N supervised positions, each counted once
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            logits = (h @ weight.t()).float()                  # (chunk, vocab): the only logits alive now
            probs = torch.softmax(logits, dim=-1)
            # -log p_y without a log_softmax pass: two probabilities' ratio is exp of their logits' difference,
            #     log p_y = log p_max + z_y - z_max,
            # and p_max >= 1/vocab never underflows (p_y itself can, when z_y is 87+ below z_max). One fused
            # softmax and two max-reductions: 1.32x as fast on CPU as log_softmax + exp (14.1 vs 18.6 ms per
            # 1,024-token chunk, 1 thread; python bench/fusions.py).
            z_max, p_max = logits.amax(dim=-1), probs.amax(dim=-1)
            loss -= (p_max.log() + logits.gather(1, y[:, None]).squeeze(1) - z_max).sum()
            del logits
            if need_grad:
                grad_logits = probs
                grad_logits[torch.arange(len(y), device=y.device), y] -= 1   # d loss / dz = softmax - onehot(y)
                grad_hidden[start:start + chunk_tokens] = grad_logits.to(weight.dtype) @ weight   # dL/dh = g W
                grad_weight += grad_logits.t() @ h.float()                                  # dL/dW = g^T h
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


def chunked_next_token_loss(hidden, weight, targets, loss_mask=None, chunk_tokens=1024):
    """next_token_loss(hidden @ weight^T, targets, loss_mask) without materialising all the logits
    (ChunkedLMHeadLoss): hidden (B, T, dim) are the model's final normed states (return_hidden=True), weight
    its output head (vocab, dim), loss_mask (B, T) 0/1. 1,024 tokens x 6,400 words of float32 logits are
    26 MB per chunk. Returns (sum of the per-token losses, number of supervised tokens), as next_token_loss does."""
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    if loss_mask is not None:
        # Only supervised positions need the head at all: in SFT the system and user tokens (about half of a
        # packed row) and the padding cost no head matmul and no softmax. Their gradient is 0 either way.
        supervised = loss_mask.flatten().nonzero().squeeze(1)
        hidden, targets = hidden[supervised], targets[supervised]
    if not torch.is_grad_enabled():
        # Evaluation (no_grad): an autograd.Function still sees weight.requires_grad and would compute the
        # gradients in its forward (two of the head's three matmuls); detached inputs tell it not to.
        hidden, weight = hidden.detach(), weight.detach()
    return ChunkedLMHeadLoss.apply(hidden, weight, targets, chunk_tokens), targets.numel()


def language_model_loss(model, batch, autocast):
    """The stage loss of pretraining and SFT, in the shape the training loop expects:
    (loss sum, number of supervised tokens, extra metric sums). Pretraining batches carry no loss_mask
    (every token is a target); SFT batches mask everything but the assistant's answers. A packed batch
    (--pack) carries seq_lens: attention and positions are kept per sample (dataset/packing.py).
    The head and the loss are computed together in chunks (chunked_next_token_loss), except for a model
    sharded with FSDP, whose head weight exists whole only inside its forward."""
    if is_sharded(model):
        with autocast():
            logits = model(batch["input_ids"], **model_inputs(batch))
        loss_sum, n_tokens = next_token_loss(logits, batch["targets"], batch.get("loss_mask"))
        return loss_sum, n_tokens, {}
    with autocast():
        hidden = model(batch["input_ids"], **model_inputs(batch), return_hidden=True)
        loss_sum, n_tokens = chunked_next_token_loss(hidden, unwrap(model).output.weight, batch["targets"],
                                                     batch.get("loss_mask"))
    return loss_sum, n_tokens, {}


def sequence_logps(logits, targets, loss_mask, seq_lens=None):
    """log pi(y | x) of each sequence's completion: the SUM over completion tokens of log p(token), in float32.

    This is the DPO paper's (and TRL's) definition: a sum, not a length-average. Averaging (MiniMind2's
    choice) shrinks the log-ratio by the answer length, so with beta 0.1 the loss hardly moves off ln 2.
    logits (N, T, V) aligned with targets (N, T) (position t predicts targets[:, t]); loss_mask (N, T) is 1
    on completion tokens. Returns (N,).
    A packed row (--pack): seq_lens are the lengths of its sequences, laid end to end; the sums are then
    taken per sequence, (len(seq_lens),), in row order."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)      # log p(target_t) at every t
    return completion_sums(token_logps, loss_mask, seq_lens)


def completion_sums(token_logps, loss_mask, seq_lens=None):
    """sum_t m_t * log p(target_t) per row, or per packed sequence (see sequence_logps)."""
    if seq_lens is not None:
        return per_sequence_sum(token_logps * loss_mask, seq_lens)
    return (token_logps * loss_mask).sum(-1)


class ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(h_t W^T)[y_t] at every position, the LM head computed chunk by chunk (as ChunkedLMHeadLoss).

    DPO needs each token's log-prob, and the gradient reaching it depends on its sequence's DPO loss, known
    only after every sequence is summed. So the trick of ChunkedLMHeadLoss (the gradient computed in the
    forward pass) does not apply; instead nothing but h and W is kept, and the backward pass recomputes each
    chunk's logits: one more head matmul, for never holding the (tokens x vocab) logits, their log-softmax
    and its gradient (3 x 105 MB float32 for 16 x 256 tokens at vocab 6,400; 3 x 1.6 GB for 8 x 1,024 pairs)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens):
        # hidden (N, dim), weight (vocab, dim), targets (N,)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_tokens = chunk_tokens
        # The backward pass recomputes the logits under the same autocast (bf16) as here, so they are the same.
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            logits = (hidden[start:start + chunk_tokens] @ weight.t()).float()
            y = targets[start:start + chunk_tokens, None]
            out[start:start + chunk_tokens] = torch.log_softmax(logits, dim=-1).gather(1, y).squeeze(1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        device, dtype, enabled = ctx.autocast
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            h, y, g = (t[start:start + ctx.chunk_tokens] for t in (hidden, targets, grad_out))
            with torch.autocast(device, dtype, enabled=enabled):
                logits = h @ weight.t()
            # d log softmax(z)[y] / dz = onehot(y) - softmax(z); times the incoming gradient of each token
            grad_logits = torch.softmax(logits.float(), dim=-1).mul_(-g[:, None])
            grad_logits[torch.arange(len(y), device=y.device), y] += g
            grad_hidden[start:start + ctx.chunk_tokens] = grad_logits.to(weight.dtype) @ weight   # dL/dh = g W
            grad_weight += grad_logits.t() @ h.float()                                  # dL/dW = g^T h
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_sequence_logps(hidden, weight, targets, loss_mask, seq_lens=None, chunk_tokens=1024):
    """sequence_logps(hidden @ weight^T, ...) without materialising all the logits (ChunkedTargetLogps):
    hidden (N, T, dim) are the model's final normed states (return_hidden=True), weight its output head.
    Only the completion tokens go through the head (the prompts' and the padding's log-probs are summed
    with weight 0 anyway); their log-probs are put back in place for the sums."""
    completion = loss_mask.flatten().nonzero().squeeze(1)
    picked = ChunkedTargetLogps.apply(hidden.flatten(0, 1)[completion], weight, targets.flatten()[completion],
                                      chunk_tokens)
    token_logps = torch.zeros(targets.numel(), dtype=picked.dtype, device=picked.device)
    token_logps = token_logps.index_put((completion,), picked)
    return completion_sums(token_logps.view(targets.shape), loss_mask, seq_lens)


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


def token_logps_and_entropy(logits, tokens, temperature=1.0):
    """Per-token log pi(token) and the entropy of each position's next-token distribution, the inputs of PPO
    and GRPO. logits (N, T, V) aligned with tokens (N, T) (position t predicts tokens[:, t]).

    The policy is the SAMPLING distribution softmax(z / temperature): the ratio pi_new / pi_old must compare
    the distributions the tokens were drawn from (TRL: GRPO divides by temperature, PPO by temperature + 1e-7).
    Entropy H_t = -sum_v p_v log p_v (nats). Float32 throughout. Returns (logps, entropy), (N, T) each."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logps = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


# ---------------------------------------------------------------------------------------------------------
# Reward model (InstructGPT, https://arxiv.org/abs/2203.02155, eq. 1; TRL's RewardTrainer.compute_loss)
# ---------------------------------------------------------------------------------------------------------

def last_non_pad_index(input_ids, pad_token_id):
    """Which position's score is each row's reward: the rightmost token that is not padding (0 if the whole
    row is padding). This is the rule of Hugging Face's *ForSequenceClassification models, which TRL uses:
        index = argmax_j ( j * [input_ids_j != pad] )
    For us (pad id 0, </s> id 2) that is the </s> that ends the answer. input_ids (N, T) -> (N,) long."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


def reward_pair_loss(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None):
    """Pairwise (Bradley-Terry) reward-model loss, per pair. Inputs (B,) scalar rewards r+ (chosen) and r-
    (rejected); `margin` (B,) an optional per-pair margin m (Llama 2, https://arxiv.org/abs/2307.09288 eq. 2).

        loss_i   = -log sigmoid(r+_i - r-_i - m_i)       # P(chosen beats rejected) = sigmoid(r+ - r-)
        center_i = c * (r+_i + r-_i)^2                   # only with c = center_rewards_coefficient

    The Bradley-Terry loss only sees reward DIFFERENCES, so the rewards can drift to any offset; the centering
    term (https://arxiv.org/abs/2312.09244 eq. 2, TRL's center_rewards_coefficient, suggested 0.01) pulls
    each pair's sum towards 0 so scores stay near zero-mean. TRL's loss is mean_i(loss_i) + mean_i(center_i):
    the mean of the per-pair sum. -log sigmoid is F.logsigmoid (stable: a gap of -45 gives 45, no overflow).
    Returns (loss (B,), center (B,)); center is all zeros when c is None."""
    z = rewards_chosen - rewards_rejected
    if margin is not None:
        z = z - margin
    losses = -F.logsigmoid(z)
    center = torch.zeros_like(losses)
    if center_rewards_coefficient:
        center = center_rewards_coefficient * (rewards_chosen + rewards_rejected) ** 2
    return losses, center


def reward_metrics(rewards_chosen, rewards_rejected):
    """What TRL's RewardTrainer logs for a batch of pairs: accuracy = share of pairs with r+ > r- (strict: a
    tie counts as wrong), margin = mean(r+ - r-) (without any margin column), and the min/mean/max of all 2B
    rewards."""
    both = torch.cat([rewards_chosen, rewards_rejected]).detach().float()
    return {"accuracy": (rewards_chosen > rewards_rejected).float().mean().item(),
            "margin": (rewards_chosen - rewards_rejected).float().mean().item(),
            "min_reward": both.min().item(), "mean_reward": both.mean().item(), "max_reward": both.max().item()}


# ---------------------------------------------------------------------------------------------------------
# KL estimators (J. Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html)
# ---------------------------------------------------------------------------------------------------------
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logps, ref_logps, estimator="k1"):
    """Per-token estimate of KL(pi || pi_ref) from tokens SAMPLED from pi, given log pi and log pi_ref of each
    sampled token. With log r = log pi_ref - log pi:
        k1 = -log r                 unbiased, but a single sample can be negative
        k2 = (log r)^2 / 2          biased, always >= 0, low variance
        k3 = (r - 1) - log r        unbiased and always >= 0 (r - 1 - log r >= 0): GRPO's choice
    PPO (TRL) puts k1 (default) or k3 into the per-token reward; GRPO adds beta * k3 to its loss."""
    log_r = ref_logps - logps
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return (log_r.exp() - 1) - log_r
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


# ---------------------------------------------------------------------------------------------------------
# Masked statistics (PPO whitening; TRL's masked_mean / masked_var / masked_whiten)
# ---------------------------------------------------------------------------------------------------------

def masked_mean(values, mask):
    """Mean of `values` over the positions where mask is 1 (all of the batch, not per row)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    """Variance over the masked positions; unbiased (Bessel, / (n - 1)) as TRL does."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the masked positions of the whole batch. shift_mean=False adds the mean
    back (only the spread is normalised): that is how PPO whitens rewards, so their sign survives."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


# ---------------------------------------------------------------------------------------------------------
# PPO (https://arxiv.org/abs/1707.06347) as TRL 1.12's PPOTrainer does it for language models
# (the recipe of https://arxiv.org/abs/2403.17031, "The N+ implementation details of RLHF with PPO").
# Tensors are (B, T) over the T RESPONSE tokens; column t is response token y_t; logps[t] and values[t] come
# from the position that predicts y_t (the last prompt token predicts y_0).
# ---------------------------------------------------------------------------------------------------------
INVALID_LOGPROB = 1.0   # TRL's filler for log-probs of padding positions: both policies get it, so KL = 0 there


def first_true_index(bools):
    """Index of the first True in each row of a (B, T) bool tensor; T where a row has none."""
    T = bools.shape[-1]
    positions = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, positions, torch.full_like(positions, T)).min(-1).values


def process_responses(responses, eos_token_id, pad_token_id, stop_token_id=None):
    """Clean up sampled responses (B, T) before scoring them.

    With a stop token (TRL: stop_token='eos'), everything AFTER the first stop token becomes padding (the stop
    token stays): sampling ran for all T tokens, but the answer ended there. Returns
      processed (B, T), sequence_lengths (B,) = index of the last real token (first pad - 1: T - 1 if there is
      no pad, -1 for an all-pad row), contain_eos (B,) bool: the processed response holds eos_token_id."""
    processed = responses
    if stop_token_id is not None:
        after_stop = torch.arange(responses.shape[1], device=responses.device) > \
            first_true_index(responses == stop_token_id).unsqueeze(1)
        processed = torch.where(after_stop, torch.full_like(responses, pad_token_id), responses)
    sequence_lengths = first_true_index(processed == pad_token_id) - 1
    contain_eos = (processed == eos_token_id).any(-1)
    return processed, sequence_lengths, contain_eos


def response_masks(sequence_lengths, T):
    """response_mask[t] = t <= L: the response tokens (EOS included) that the policy is trained on.
    value_mask[t] = t <= L + 1: ONE position more, the state after the last token, where the score sits
    (see ppo_rewards) and where the critic is trained too. Both (B, T) bool."""
    positions = torch.arange(T, device=sequence_lengths.device).unsqueeze(0)
    return positions <= sequence_lengths.unsqueeze(1), positions <= (sequence_lengths + 1).unsqueeze(1)


def ppo_rewards(logps, ref_logps, scores, sequence_lengths, response_mask, kl_coef, kl_estimator="k1"):
    """Per-token rewards of PPO for language models (InstructGPT eq. 2, written per token):

        r_t = -kl_coef * kl_t                  kl_t = k1 (log pi - log pi_ref) or k3, see kl_estimate
        r_e += score                           e = L + 1 if L + 1 < T else L

    The KL penalty at every token keeps the policy close to the reference (the SFT model); the reward model's
    score of the whole answer is paid once, at the end. TRL (after OpenAI's lm-human-preferences) puts it on
    the position AFTER the last real token (the first pad after EOS) when there is one, so it lies outside the
    response mask but inside the value mask; GAE still carries it back to every token.
    logps/ref_logps (B, T) are masked to INVALID_LOGPROB outside response_mask here (so kl = 0 there).
    Returns (kl, non_score_reward, rewards, score_position)."""
    invalid = torch.full_like(logps, INVALID_LOGPROB)
    logps = torch.where(response_mask, logps, invalid)
    ref_logps = torch.where(response_mask, ref_logps, invalid)
    kl = kl_estimate(logps, ref_logps, kl_estimator)
    non_score_reward = -kl_coef * kl
    T = logps.shape[1]
    score_position = torch.where(sequence_lengths + 1 < T, sequence_lengths + 1, sequence_lengths)
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), score_position] += scores
    return kl, non_score_reward, rewards, score_position


def gae(rewards, values, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (https://arxiv.org/abs/1506.02438 eq. 16), right to left over T:

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_T = 0: nothing after the last position)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                             the critic's regression target (the "returns")

    lam trades bias (lam = 0: one-step TD, trusts the critic) for variance (lam = 1: Monte-Carlo return).
    values must be 0 outside the value mask, rewards too. Returns (advantages, returns), (B, T) each."""
    T = rewards.shape[1]
    advantages_reversed, last = [], torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages_reversed.append(last)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def ppo_advantages(logps, ref_logps, values, scores, sequence_lengths, kl_coef=0.05, kl_estimator="k1",
                   gamma=1.0, lam=0.95, whiten_rewards=False):
    """The whole of PPO's rollout post-processing after scoring, as TRL does it: masks, per-token rewards,
    optional reward whitening, GAE, and advantage whitening over the response tokens of the WHOLE batch
    (mean 0, unbiased variance 1; 0 outside the response mask). Returns a dict of (B, T) tensors."""
    T = logps.shape[1]
    response_mask, value_mask = response_masks(sequence_lengths, T)
    values = torch.where(value_mask, values, torch.zeros_like(values))
    kl, non_score_reward, rewards, score_position = ppo_rewards(logps, ref_logps, scores, sequence_lengths,
                                                                response_mask, kl_coef, kl_estimator)
    if whiten_rewards:   # normalise the reward scale (mean kept), then clear the positions after the value mask
        rewards = masked_whiten(rewards, value_mask, shift_mean=False)
        rewards = torch.where(value_mask, rewards, torch.zeros_like(rewards))
    raw_advantages, returns = gae(rewards, values, gamma, lam)
    advantages = masked_whiten(raw_advantages, response_mask)
    advantages = torch.where(response_mask, advantages, torch.zeros_like(advantages))
    return {"response_mask": response_mask, "value_mask": value_mask, "values": values, "kl": kl,
            "non_score_reward": non_score_reward, "rewards": rewards, "score_position": score_position,
            "gae_advantages": raw_advantages, "returns": returns, "advantages": advantages}


def ppo_policy_loss(new_logps, old_logps, advantages, response_mask, cliprange=0.2):
    """PPO's clipped surrogate (https://arxiv.org/abs/1707.06347 eq. 7), as a loss, token mean over the batch:

        rho_t = exp(log pi_new(y_t) - log pi_old(y_t))
        L     = mean_t over response tokens of max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))

    The max of the two (the min of the objectives) removes any gain from moving rho beyond [1-eps, 1+eps] in
    the direction the advantage favours: small, trusted steps from the policy that sampled the data.
    new_logps outside the mask are set to INVALID_LOGPROB like the old ones (ratio 1 there, no gradient).
    Returns (loss, stats): clipfrac = share of response tokens where the clipped branch is active,
    approxkl = 1/2 mean over ALL B x T positions of (log rho)^2, ratio_mean over all positions."""
    new_logps = torch.where(response_mask, new_logps, torch.full_like(new_logps, INVALID_LOGPROB))
    log_ratio = new_logps - old_logps
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), response_mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), response_mask).detach(),
             "approxkl": (0.5 * (log_ratio ** 2).mean()).detach(), "ratio_mean": ratio.mean().detach(),
             "ratio": ratio.detach(), "per_token_loss": torch.max(unclipped, clipped).detach()}
    return loss, stats


def ppo_value_loss(new_values, old_values, returns, value_mask, cliprange_value=0.2):
    """The critic's clipped regression onto the GAE returns (PPO2 / OpenAI baselines), over the value mask:

        V_clip = clip(V_new, V_old - eps_v, V_old + eps_v)
        L      = 1/2 mean_t of max((V_new - R_t)^2, (V_clip - R_t)^2)

    Like the policy clip, it stops the critic moving far from its rollout-time values in one update.
    Returns (loss, stats) with clipfrac = share of value positions where the clipped error is the larger."""
    new_values = torch.where(value_mask, new_values, torch.zeros_like(new_values))
    clipped_values = torch.clamp(new_values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = (new_values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), value_mask)
    stats = {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), value_mask).detach(),
             "per_token_loss": torch.max(unclipped_error, clipped_error).detach()}
    return loss, stats


def ppo_rollout_metrics(kl, logps, non_score_reward, response_mask, scores):
    """TRL's once-per-batch objective/* metrics: sums over each response's tokens, means over responses.
    objective/entropy is the sampled sequence entropy (sum of -log pi over the response)."""
    logps = torch.where(response_mask, logps, torch.zeros_like(logps))
    non_score = non_score_reward.sum(1).mean()
    return {"objective/kl": kl.sum(1).mean().item(), "objective/entropy": (-logps).sum(1).mean().item(),
            "objective/non_score_reward": non_score.item(),
            "objective/rlhf_reward": (non_score + scores.mean()).item(), "objective/scores": scores.mean().item()}


# ---------------------------------------------------------------------------------------------------------
# GRPO (DeepSeekMath, https://arxiv.org/abs/2402.03300) and its variants, as TRL 1.16's GRPOTrainer does them.
# Rows are completions, G consecutive rows per prompt; per-token tensors (N, T) cover completion tokens only.
# ---------------------------------------------------------------------------------------------------------
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards, num_generations, scale_rewards="group", eps=1e-4):
    """GRPO's advantage: how much better a completion scored than its siblings (same prompt), no critic.

        A_i = (R_i - mean_g) / (std_g + eps)          (DeepSeekMath eq. of section 4.1.2)

    over each prompt's G = num_generations consecutive rows; std is Bessel-corrected (/(G-1)) as in TRL.
    scale_rewards: "group" divides by the group's std, "batch" by the std of all N rewards (mean still per
    group), "none" does not divide (Dr. GRPO, https://arxiv.org/abs/2503.20783: the std division up-weights
    prompts that are too easy or too hard). A group whose rewards are all equal has std 0 and gets A = 0
    exactly (0 / (0 + eps)): no learning signal, and no NaN.
    Returns (advantages, group_mean, group_std, is_std_zero), each (N,)."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    groups = rewards.view(-1, num_generations)
    group_mean = groups.mean(1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)                 # torch.std is Bessel-corrected
    else:
        std = groups.std(1).repeat_interleave(num_generations)
    advantages = rewards - group_mean
    if scale_rewards != "none":
        advantages = advantages / (std + eps)
    return advantages, group_mean, std, torch.isclose(std, torch.zeros_like(std))


def grpo_token_losses(logps, old_logps, advantages, mask, loss_type="dapo", epsilon_low=0.2, epsilon_high=None,
                      delta=None, importance_sampling_level="token", beta=0.0, ref_logps=None,
                      use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                      vespo_k=(2.0, 3.0), vespo_lambda=(3.0, 2.0)):
    """Per-token GRPO losses, before aggregation. logps (N, T) are the current policy's log-probs of the
    completion tokens (the tensor to differentiate), old_logps those of the policy that sampled them (with one
    update per rollout: logps.detach(), so rho = 1 but the gradient still flows), advantages (N,).

    Importance ratio: token level rho_t = exp(log pi - log pi_old); sequence level (GSPO,
    https://arxiv.org/abs/2507.18071) one rho per completion, exp(mean over its tokens of the log-ratio).
    Per-token loss l_t by loss_type:
      grpo, bnpo, dr_grpo, dapo, luspo:  -min(rho' A, clip(rho, 1 - eps_low, 1 + eps_high) A)
                      (PPO's clip; eps_high > eps_low is DAPO's "clip-higher", https://arxiv.org/abs/2503.14476;
                      rho' = min(rho, delta) when delta is set: INTELLECT-2's cap on the unclipped side)
      cispo:          -stopgrad(min(rho, eps_high)) A log pi    (MiniMax-M1: clip the weight, keep every
                      token's gradient)
      sapo:           -(4 / tau) sigmoid(tau (rho - 1)) A       (a soft clip; tau_pos if A > 0 else tau_neg)
      vespo:          -stopgrad(phi) A log pi, one weight per sequence from its clamped summed log-ratio
                      s: w = exp(clamp(s, log 1e-8, 20)), phi = exp(lam + k log w - lam w) = e^lam w^k e^(-lam w)
                      (a gamma-shaped weight, 1 at w = 1; (k, lam) = (2, 3) if A >= 0 else (3, 2), TRL's defaults)
    With beta != 0, + beta * D_t, D_t = k3(pi, pi_ref) (kl_estimate), times rho when use_bias_correction_kl
    (TRL's default: it makes the KL GRADIENT unbiased; it changes the gradient even when rho = 1).
    Returns a dict: per_token_loss, ratio, log_ratio, per_token_kl (None when beta == 0), all (N, T); and
    for vespo phi (N,)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weight = log_ratio
    elif importance_sampling_level == "sequence":
        log_weight = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = log_weight.exp()
    A = advantages.unsqueeze(1)
    if loss_type == "cispo":
        per_token_loss = -ratio.clamp(max=epsilon_high).detach() * A * logps
    elif loss_type == "vespo":
        seq_log_ratio = (log_ratio.clamp(-20, 20) * mask).sum(-1)
        log_w = seq_log_ratio.clamp(min=math.log(1e-8), max=20.0).detach()
        positive = advantages >= 0
        k = torch.where(positive, torch.full_like(log_w, vespo_k[0]), torch.full_like(log_w, vespo_k[1]))
        lam = torch.where(positive, torch.full_like(log_w, vespo_lambda[0]), torch.full_like(log_w, vespo_lambda[1]))
        phi = torch.exp(lam + k * log_w - lam * log_w.exp())
        per_token_loss = -phi.unsqueeze(1) * A * logps
    elif loss_type == "sapo":
        tau = torch.where(A > 0, torch.full_like(A, sapo_temperature_pos), torch.full_like(A, sapo_temperature_neg))
        per_token_loss = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * A
    else:
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            ratio = ratio.clamp(max=delta)
        per_token_loss = -torch.min(ratio * A, clipped * A)
    per_token_kl = None
    if beta != 0.0:
        per_token_kl = kl_estimate(logps, ref_logps, "k3")
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl
    ratio_full = ratio.expand_as(logps)
    out = {"per_token_loss": per_token_loss.expand_as(logps), "ratio": ratio_full, "log_ratio": log_ratio,
           "per_token_kl": per_token_kl}
    if loss_type == "vespo":
        out["phi"] = phi
    return out


def grpo_aggregate(per_token_loss, mask, loss_type="dapo", max_completion_length=None, num_items_in_batch=None,
                   accumulation_steps=1):
    """Reduce per-token losses (n, T) of one micro-batch to the scalar to back-propagate. The choice decides
    how much each TOKEN weighs, which is where the GRPO variants differ:

      grpo, sapo:         (1/n) sum_i (sum_t m l / |o_i|)   per-sequence mean, then mean over sequences: a
                                                            token of a short answer weighs more (DeepSeekMath;
                                                            the length bias Dr. GRPO points out)
      bnpo:               sum m l / sum m                   token mean over this micro-batch
      dr_grpo:            sum m l / (n * max_completion_length)   a constant normaliser (Dr. GRPO)
      dapo, cispo, vespo: sum m l / num_items_in_batch      token mean over the WHOLE generation batch: every
                                                            token weighs the same however it is split (DAPO)
      luspo:              (1/n) sum_i sum_t m l             per-sequence sums

    accumulation_steps (GA) divides the micro-batch losses so their sum over a step is the step's loss
    (dapo's num_items_in_batch already counts the whole step's tokens)."""
    mask = mask.to(per_token_loss.dtype)
    n = per_token_loss.shape[0]
    token_sum = (per_token_loss * mask).sum()
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation_steps
    if loss_type == "bnpo":
        return token_sum / mask.sum().clamp(min=1.0) / accumulation_steps
    if loss_type == "dr_grpo":
        return token_sum / (n * max_completion_length) / accumulation_steps
    if loss_type in ("dapo", "cispo", "vespo"):
        return token_sum / num_items_in_batch
    if loss_type == "luspo":
        return (per_token_loss * mask).sum(-1).mean() / accumulation_steps
    raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")


def grpo_clip_metrics(ratio, advantages, mask, epsilon_low=0.2, epsilon_high=None, loss_type="dapo"):
    """TRL's clip_ratio/* metrics of one micro-batch: the share of completion tokens where the clip is active
    (low: rho < 1 - eps_low with A < 0; high: rho > 1 + eps_high with A > 0), and the min / max over
    completions of each completion's low / high share (completions with an empty mask are left out).
    cispo clips only the weight from above: cispo_clip_ratio = share of tokens with rho > eps_high and A > 0."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.float()
    A = advantages.unsqueeze(1)
    if loss_type == "vespo":
        return {}
    if loss_type == "cispo":
        return {"cispo_clip_ratio": ((((ratio > epsilon_high) & (A > 0)).float() * mask).sum()
                                     / mask.sum().clamp(min=1.0)).item()}
    low = ((ratio < 1 - epsilon_low) & (A < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (A > 0)).float()
    region = ((low + high) > 0).float()
    total = mask.sum().clamp(min=1.0)
    rows = mask.sum(-1) > 0
    per_row = lambda x: ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[rows]
    return {"clip_ratio/low_mean": ((low * mask).sum() / total).item(),
            "clip_ratio/high_mean": ((high * mask).sum() / total).item(),
            "clip_ratio/region_mean": ((region * mask).sum() / total).item(),
            "clip_ratio/low_min": per_row(low).min().item() if rows.any() else float("nan"),
            "clip_ratio/high_max": per_row(high).max().item() if rows.any() else float("nan")}


def grpo_reward_metrics(rewards, is_std_zero, rewards_per_func=None, reward_func_names=()):
    """TRL's reward metrics of a generation batch: reward / reward_std (Bessel) of the summed reward, the
    share of rows in zero-std groups, and the mean / std of each reward function's raw values."""
    metrics = {}
    for k, name in enumerate(reward_func_names):
        metrics[f"rewards/{name}/mean"] = rewards_per_func[:, k].mean().item()
        metrics[f"rewards/{name}/std"] = rewards_per_func[:, k].std().item()
    metrics.update({"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                    "frac_reward_zero_std": is_std_zero.float().mean().item()})
    return metrics


def completion_length_metrics(lengths, truncated):
    """TRL's completions/* metrics: lengths (N,) in tokens (EOS included), truncated (N,) bool = no EOS."""
    lengths = lengths.float()
    done = lengths[~truncated]
    some = len(done) > 0
    return {"completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": truncated.float().mean().item(),
            "completions/mean_terminated_length": done.mean().item() if some else 0.0,
            "completions/min_terminated_length": done.min().item() if some else 0.0,
            "completions/max_terminated_length": done.max().item() if some else 0.0}

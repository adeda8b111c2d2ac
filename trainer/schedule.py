import math


def lr_at(step, total_steps, peak_lr, warmup_iters, min_ratio=0.1):
    """Learning rate for optimizer step `step` (0-based): linear warmup to exactly `peak_lr` at step
    `warmup_iters`, then a cosine from peak_lr down to peak_lr * min_ratio at the last step.

    Warmup keeps the first updates small while AdamW's second-moment estimates are still noisy."""
    if step < warmup_iters:
        return peak_lr * (step + 1) / (warmup_iters + 1)
    decay_steps = max(1, total_steps - 1 - warmup_iters)
    progress = min(1.0, (step - warmup_iters) / decay_steps)
    min_lr = peak_lr * min_ratio
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))

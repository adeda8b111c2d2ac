"""Sampling from the model, one token at a time, through the KV cache.

`generate` is a generator: it yields each new token id as soon as it is chosen, so a chat can print the
answer as it is written. The prompt is run through the model once (prefill); after that each step feeds only
the newest token, and attention reads the cached keys/values of everything before it.
"""
import torch

from .model import KVCache
from .tokenizer import EOS_ID


def sample_next(logits, generated, temperature=0.85, top_k=0, top_p=1.0, repetition_penalty=1.0, generator=None):
    """Pick the next token from the logits (vocab,) of the last position.

    repetition_penalty > 1 makes tokens already in `generated` less likely (CTRL, arXiv:1909.05858: divide a
    positive logit, multiply a negative one). temperature 0 means greedy. top_k keeps the k most likely
    tokens; top_p keeps the smallest set whose probabilities sum to >= top_p (nucleus sampling)."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and generated:
        seen = torch.tensor(sorted(set(generated)), device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits[order[drop]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens=256, temperature=0.85, top_k=0, top_p=1.0,
             repetition_penalty=1.0, eos_id=EOS_ID, use_cache=True, generator=None):
    """Yield up to `max_new_tokens` new token ids after `prompt_ids` (a list); stop after yielding eos_id.

    use_cache=False recomputes the whole sequence every step (slow; kept to test the cache against)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, 1, len(ids) + max_new_tokens, device, dtype) if use_cache else None
    try:
        step_input = ids
        for _ in range(max_new_tokens):
            x = torch.tensor([step_input if use_cache else ids], device=device)
            logits = model.output(model(x, cache=cache, return_hidden=True)[0, -1])   # the head at the last position only
            tok = sample_next(logits, ids if repetition_penalty != 1.0 else None, temperature, top_k, top_p,
                              repetition_penalty, generator)
            ids.append(tok)
            yield tok
            if tok == eos_id:
                break
            step_input = [tok]
    finally:
        model.train(was_training)

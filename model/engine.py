"""Batched generation: many conversations decoded together, each at its own length.

`generate` (model/generate.py) runs one sequence. A server with many users, or RL rollouts, want one forward
per step for all of them. The rows of such a batch have prompts of different lengths, start at different
times and stop at different times. This engine keeps per-row position bookkeeping (no left padding):

  * The KV cache has `max_batch_size` slots. A request takes a free slot; its prompt's keys and values go to
    positions 0..L-1 of that slot, its n-th new token to position L+n-1. A row's position is its own length.
  * RoPE rotates each token by its own row's position (Transformer.forward(positions=...)).
  * Attention mask: the query at position p of a row reads that row's slots 0..p and nothing else. What lies
    past p in the slot (padding written by a prefill, or the keys of the slot's previous request) is never
    read, and every position up to p was written by this request. A row reads only its own slot (the batch
    dimension), so no row sees another's tokens or padding.
  * Prefill: the prompts of the requests joining at this step run together, right-padded to the longest.
    The pad tokens sit at positions after their prompt, so no real token reads them; the answer's tokens
    overwrite them later.
  * Decode: one token per running row per step. A row that ends (</s>, a stop string, max_new_tokens, or
    the context is full) frees its slot at once; a waiting request takes it at the next step (continuous
    batching). The others never wait for it.

Sampling is `sample_next` from model/generate.py, row by row, each row with its own settings and its own
random generator (a per-request seed), so a row samples exactly what `generate` would sample for it alone.
"""
from collections import deque
from dataclasses import dataclass, field

import torch

from .generate import sample_next
from .tokenizer import EOS_ID


@dataclass(eq=False)  # eq=False: requests compare by identity (two equal prompts are two requests)
class Request:
    """One sequence to continue, with its sampling settings. The engine fills in the fields below the line."""
    prompt_ids: list
    max_new_tokens: int = 256
    temperature: float = 0.85         # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple = ()                  # strings that end the answer (not included in its text); needs a tokenizer
    seed: int = None                  # None: a fresh random seed (the one used is stored back here)
    generator: torch.Generator = None  # or share one generator across requests (eval_model's whole session)
    eos_id: int = EOS_ID
    cancelled: bool = False           # set from any thread (the client left): the row leaves at the next step
    # --- filled in by the engine ---
    tokens: list = field(default_factory=list)  # every sampled token, as `generate` yields them (</s> included)
    text: str = ""                    # the answer's text released so far (see Engine._release_text)
    finish_reason: str = None         # "stop" (</s> or a stop string), "length", or "cancelled"
    decoded: int = 0                  # how many tokens' text is final (see Engine._release_text) ...
    decoded_text: str = ""            # ... and that text

    @property
    def finished(self):
        return self.finish_reason is not None


class SlotKVCache:
    """Keys and values for `slots` rows, each row written at its own positions.

    Before each forward the engine sets `rows` (which slots this batch's rows are), `positions` (n, T) (where
    each new token goes) and `key_len` (how many slots of keys attention reads: the longest row). The buffers
    start small and grow (doubling) up to `max_len`, so a long context costs memory only when it is used."""

    def __init__(self, cfg, slots, max_len, device, dtype, start_len=256):
        self.cfg, self.slots, self.max_len, self.device, self.dtype = cfg, slots, max_len, device, dtype
        shape = (slots, cfg.n_kv_heads, min(start_len, max_len), cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.rows = self.positions = None
        self.key_len = 0

    def ensure(self, length):
        """Make room for `length` positions in every slot (copying what is there into bigger buffers)."""
        size = self.k[0].shape[2]
        if length <= size:
            return
        if length > self.max_len:
            raise ValueError(f"KV cache full: {length} positions > max_len {self.max_len}")
        new_size = min(self.max_len, max(length, 2 * size))
        for buffers in (self.k, self.v):
            for layer, old in enumerate(buffers):
                grown = old.new_zeros(old.shape[0], old.shape[1], new_size, old.shape[3])
                grown[:, :, :size] = old
                buffers[layer] = grown

    def update(self, layer, k, v):
        """Write this step's k, v (n, kv_heads, T, hd) at each row's positions; return each row's first
        `key_len` keys and values (n, kv_heads, key_len, hd) for attention."""
        # buffer[rows, :, positions] has shape (n, T, kv_heads, hd): the indexed dimensions come first.
        rows = self.rows[:, None]
        self.k[layer][rows, :, self.positions] = k.transpose(1, 2)
        self.v[layer][rows, :, self.positions] = v.transpose(1, 2)
        return self.k[layer][self.rows, :, :self.key_len], self.v[layer][self.rows, :, :self.key_len]


class Engine:
    """Continuous batching over one model. `add` requests (from the same thread), call `step` until
    `has_work()` is False; each step returns the requests that got a token (their `tokens`, `text` and
    `finish_reason` are updated). `stream(request)` does all of that for a single request."""

    def __init__(self, model, tokenizer=None, max_batch_size=8, max_len=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_len = max_len or model.cfg.max_seq_len  # context per row: prompt + answer
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache(model.cfg, max_batch_size, self.max_len, self.device,
                                 next(model.parameters()).dtype)
        self.slots = [None] * max_batch_size   # the request decoding in each slot, or None (free)
        self.lengths = [0] * max_batch_size    # positions of the cache filled in each slot
        self.waiting = deque()                 # added, not yet in a slot

    def add(self, request):
        """Queue a request; it joins the batch at the next step with a free slot."""
        if not request.prompt_ids:
            raise ValueError("empty prompt: give at least one token (e.g. <s>)")
        if len(request.prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens leaves no room in a context of "
                             f"{self.max_len} tokens")
        if request.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to have a tokenizer")
        if request.generator is None:
            request.generator = torch.Generator(device=self.device)
            if request.seed is None:
                request.seed = request.generator.seed()  # fresh from the OS, stored so a run can be repeated
            else:
                request.generator.manual_seed(request.seed)
        # The answer also ends where the context does (as eval_model.py does it).
        request.max_new_tokens = min(request.max_new_tokens, self.max_len - len(request.prompt_ids))
        self.waiting.append(request)

    def has_work(self):
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def cancel(self, request):
        """Drop a request wherever it is (waiting or decoding); its slot is free for the next step."""
        if request in self.waiting:
            self.waiting.remove(request)
        for i, r in enumerate(self.slots):
            if r is request:
                self.slots[i] = None
        if not request.finished:
            request.finish_reason = "cancelled"

    @torch.inference_mode()
    def step(self):
        """One decoding step for every running row, and the prefill of the requests joining now (they get
        their first token in this step). Returns the requests that got a token."""
        for request in [r for r in self.slots + list(self.waiting) if r is not None and r.cancelled]:
            self.cancel(request)
        running = [i for i, r in enumerate(self.slots) if r is not None]
        joining = []
        while self.waiting and None in self.slots:
            slot = self.slots.index(None)
            self.slots[slot] = self.waiting.popleft()
            self.lengths[slot] = 0  # the previous request's keys stay, unread: positions 0.. are rewritten
            joining.append(slot)
        was_training = self.model.training
        self.model.eval()
        try:
            served = []
            if running:
                served += self._forward(running, [[self.slots[i].tokens[-1]] for i in running])
            if joining:
                served += self._forward(joining, [self.slots[i].prompt_ids for i in joining])
            return served
        finally:
            self.model.train(was_training)

    def _forward(self, slots, new_tokens):
        """Run each row's new tokens (a list per slot) through the model at the row's next positions, sample
        one token per row from the logits of its last new token, and retire the rows that are done."""
        longest = max(len(t) for t in new_tokens)
        starts = torch.tensor([self.lengths[i] for i in slots], device=self.device)
        # Right-pad to the longest; the pads' positions continue after the row's tokens (see the module note).
        # The pad id does not matter (nothing reads a pad): 0.
        ids = torch.tensor([t + [0] * (longest - len(t)) for t in new_tokens], device=self.device)
        positions = starts[:, None] + torch.arange(longest, device=self.device)[None, :]      # (n, T)
        key_len = int(positions.max()) + 1
        self.cache.ensure(key_len)
        # Query at position p reads key slots 0..p of its own row: causal, and blind to what lies past p.
        attn_mask = torch.arange(key_len, device=self.device)[None, None, :] <= positions[:, :, None]  # (n, T, S)
        self.cache.rows = torch.tensor(slots, device=self.device)
        self.cache.positions, self.cache.key_len = positions, key_len
        hidden = self.model(ids, cache=self.cache, positions=positions, attn_mask=attn_mask, return_hidden=True)
        # Only each row's last new token is sampled from: the head runs on those n positions alone, not on a
        # whole prompt's (a prompt of P tokens would cost P times the head's matmul and softmax at prefill).
        last = torch.tensor([len(t) - 1 for t in new_tokens], device=self.device)
        logits = self.model.output(hidden[torch.arange(len(slots), device=self.device), last])    # (n, vocab)
        served = []
        for row, (slot, tokens) in enumerate(zip(slots, new_tokens)):
            self.lengths[slot] += len(tokens)
            request = self.slots[slot]
            # `generate` passes the prompt and the answer so far to the repetition penalty: so do we.
            seen = request.prompt_ids + request.tokens if request.repetition_penalty != 1.0 else None
            tok = sample_next(logits[row], seen, request.temperature, request.top_k,
                              request.top_p, request.repetition_penalty, request.generator)
            request.tokens.append(tok)
            if tok == request.eos_id:
                request.finish_reason = "stop"
            elif len(request.tokens) >= request.max_new_tokens:
                request.finish_reason = "length"
            if self.tokenizer is not None:
                self._release_text(request)
            if request.finished:
                self.slots[slot] = None  # the slot is free for a waiting request at the next step
            served.append(request)
        return served

    def _release_text(self, request):
        """Update request.text: the answer decoded so far, cut at the first stop string (which ends the
        answer). While it runs, text that may still change is held back: a character whose bytes are not all
        there yet (it decodes as U+FFFD), and an ending that could be the start of a stop string."""
        answer = request.tokens[:-1] if request.tokens[-1] == request.eos_id else request.tokens
        # Decode only the tokens after the last complete character: the text before it never changes (the
        # tokenizer works on bytes, so decode(a + b) == decode(a) + decode(b) when a ends a character).
        # Decoding the whole answer at every step would cost O(length^2) over an answer.
        tail = self.tokenizer.decode(answer[request.decoded:])
        text = request.decoded_text + tail
        if not tail.endswith("\ufffd"):
            request.decoded, request.decoded_text = len(answer), text
        cuts = [text.find(s) for s in request.stop if s and s in text]
        if cuts:
            text, request.finish_reason = text[:min(cuts)], "stop"
        elif not request.finished:
            text = text.rstrip("\ufffd")
            hold = max([k for s in request.stop for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
            text = text[:len(text) - hold]
        if text.startswith(request.text):  # released text only ever grows
            request.text = text

    def stream(self, request):
        """Yield the tokens of one request as they come (stepping the whole batch); if the caller stops
        early (an exception such as Ctrl-C, or closing the generator), the request is dropped."""
        self.add(request)
        done = 0
        try:
            while not request.finished:
                self.step()
                yield from request.tokens[done:]
                done = len(request.tokens)
        finally:
            if not request.finished:
                self.cancel(request)


def generate_batch(model, prompts, tokenizer=None, max_batch_size=None, max_len=None, **sampling):
    """The tokens `generate` would yield for each prompt (a list of id lists), computed in batches.
    sampling: the Request fields (max_new_tokens, temperature, top_p, ..., seed)."""
    engine = Engine(model, tokenizer, max_batch_size or len(prompts), max_len)
    requests = [Request(list(p), **sampling) for p in prompts]
    for request in requests:
        engine.add(request)
    while engine.has_work():
        engine.step()
    return [r.tokens for r in requests]

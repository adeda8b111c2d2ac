"""Packing (--pack): several short samples share one row of the batch instead of each getting a padded row.

SFT conversations and DPO answers vary a lot in length; padding every row to the longest one computes (and
throws away) a lot of padding. Packed, a micro-batch's samples are laid end to end into as few rows of at most
`capacity` tokens as they fit in:

    unpacked (3 rows x 6)        packed (1 row x 6 + a row of 3 ... here: 2 rows)
    a a a . . .                  a a a b b .
    b b . . . .                  c c c c c c
    c c c c c c

Two things keep a packed row computing exactly what the separate rows did:
  - attention never crosses a sample boundary: a block-diagonal causal mask (token t of sample s sees the
    tokens of s up to t, nothing of the other samples);
  - positions restart at 0 for every sample, so RoPE rotates each token by the same angle as unpacked.
Every token of a row carries the number of its sample (seq_ids, -1 for the padding at the end of a row): the
mask and the positions are both derived from it (packed_attention), and so are per-sample sums such as DPO's
sequence log-probs (per_sequence_sum). Packing happens inside each micro-batch of the batch plan, so the data
order, resuming and the loss normalisation (by the number of loss terms) are exactly those of unpacked runs.
"""
import torch

from model.tokenizer import PAD_ID

PAD_SEQ = -1  # the seq_id of the padding at the end of a packed row


def pack_rows(rows, capacity):
    """rows: list of (ids, mask) with len(ids) - 1 <= capacity (inputs and targets are ids shifted by one).

    First-fit decreasing: the longest sample first, each into the first row with room left (deterministic:
    ties keep the input order). Returns input_ids, targets, loss_mask, seq_ids, all (R, W) with W the longest
    packed row; seq_ids[r, t] is the index in `rows` of the sample that token belongs to (PAD_SEQ: padding)."""
    lengths = [len(ids) - 1 for ids, _ in rows]
    if max(lengths) > capacity:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a packed row of {capacity}")
    packed, room = [], []   # packed[r]: sample indices placed in row r; room[r]: tokens still free there
    for i in sorted(range(len(rows)), key=lambda i: -lengths[i]):   # sorted() is stable
        r = next((r for r in range(len(packed)) if room[r] >= lengths[i]), None)
        if r is None:
            packed.append([])
            room.append(capacity)
            r = len(packed) - 1
        packed[r].append(i)
        room[r] -= lengths[i]
    width = max(capacity - free for free in room)
    shape = (len(packed), width)
    input_ids, targets = torch.full(shape, PAD_ID, dtype=torch.long), torch.full(shape, PAD_ID, dtype=torch.long)
    loss_mask, seq_ids = torch.zeros(shape, dtype=torch.long), torch.full(shape, PAD_SEQ, dtype=torch.long)
    for r, members in enumerate(packed):
        t = 0
        for i in members:
            ids, mask = rows[i]
            n = lengths[i]
            input_ids[r, t:t + n] = torch.tensor(ids[:-1])
            targets[r, t:t + n] = torch.tensor(ids[1:])
            loss_mask[r, t:t + n] = torch.tensor(mask[1:])   # mask[t+1]: is the target of position t supervised?
            seq_ids[r, t:t + n] = i
            t += n
    return input_ids, targets, loss_mask, seq_ids


def packed_attention(seq_ids):
    """seq_ids (B, T) -> positions (B, T), attn_mask (B, T, T) bool, the two extra inputs of Transformer.forward.

    attn_mask[b, q, k] is True when query token q may read key token k: same sample, and k not after q
        (block-diagonal causal: one lower triangle per sample, zeros between samples).
    positions: how far each token is from the first token of its sample, so each sample starts at 0.
    The padding at the end of a row is one more "sample" (PAD_SEQ): it reads only padding, and every query
    has at least one key to read (a query row of the mask that is all False would give NaN in attention)."""
    B, T = seq_ids.shape
    index = torch.arange(T, device=seq_ids.device).expand(B, T)
    starts = torch.ones_like(seq_ids, dtype=torch.bool)             # a sample starts where the id changes
    starts[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values      # index of the current sample's first token
    positions = index - first
    same_sample = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    return positions, same_sample & causal


def model_inputs(batch):
    """The keyword arguments of model(batch["input_ids"], ...): none for an unpacked batch (plain causal
    attention), positions and attn_mask for a packed one."""
    if "seq_ids" not in batch:
        return {}
    positions, attn_mask = packed_attention(batch["seq_ids"])
    return {"positions": positions, "attn_mask": attn_mask}


def per_sequence_sum(values, seq_ids, n_sequences):
    """Sum `values` (B, T) over the tokens of each sample: (n_sequences,), sample i = the tokens with seq_id i.
    Padding (PAD_SEQ) is left out: zeroed, then added to sample 0 only to keep every index valid."""
    values = torch.where(seq_ids == PAD_SEQ, torch.zeros_like(values), values)
    flat_ids = seq_ids.flatten().clamp(min=0)
    return torch.zeros(n_sequences, dtype=values.dtype, device=values.device).index_add(0, flat_ids, values.flatten())

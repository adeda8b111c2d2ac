"""Packing (--pack): the samples of a micro-batch laid end to end in ONE row instead of each getting a padded row.

SFT conversations and DPO answers vary a lot in length; padding every row to the longest one computes (and
throws away) a lot of padding. Packed, nothing is padding: the B samples of a micro-batch become one row of
L_1 + ... + L_B tokens (the layout of FlashAttention's "varlen" kernels):

    padded (3 rows x 6)          packed (1 row x 11)
    a a a . . .                  a a a b b c c c c c c
    b b . . . .
    c c c c c c

Two things keep the packed row computing exactly what the separate rows did:
  - attention never crosses a sample boundary: each sample gets its own causal attention over its own
    tokens (model.packed_causal_attention, given the samples' lengths, seq_lens);
  - positions restart at 0 for every sample, so RoPE rotates each token by the same angle as unpacked.
The same lengths split the row again for per-sample sums such as DPO's sequence log-probs
(per_sequence_sum). Packing happens inside each micro-batch of the batch plan, so the data order,
resuming and the loss normalisation (by the number of loss terms) are exactly those of unpacked runs.
"""
import torch


def pack_rows(rows):
    """rows: list of (ids, mask); inputs and targets are ids shifted by one, so sample i has L_i = len(ids) - 1
    positions. Returns input_ids, targets, loss_mask, all (1, L_1 + ... + L_B), and seq_lens, the list
    [L_1, ..., L_B] that says where each sample starts and ends."""
    input_ids = torch.tensor([[t for ids, _ in rows for t in ids[:-1]]])
    targets = torch.tensor([[t for ids, _ in rows for t in ids[1:]]])
    loss_mask = torch.tensor([[m for _, mask in rows for m in mask[1:]]])  # mask[t+1]: is the target of t supervised?
    seq_lens = [len(ids) - 1 for ids, _ in rows]
    return input_ids, targets, loss_mask, seq_lens


def model_inputs(batch):
    """The keyword arguments of model(batch["input_ids"], ...): none for an unpacked batch (plain causal
    attention), the samples' lengths for a packed one (attention and positions kept per sample)."""
    return {"seq_lens": batch["seq_lens"]} if "seq_lens" in batch else {}


def per_sequence_sum(values, seq_lens):
    """Sum `values` (1, T) over the tokens of each sample of a packed row: (len(seq_lens),), in row order."""
    return torch.stack([part.sum() for part in values.flatten().split(seq_lens)])

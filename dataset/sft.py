"""SFT data: `{"conversations": [...]}` (or `{"messages": [...]}`) JSONL -> (ids, loss mask) per conversation.

Files are indexed, not loaded (dataset/jsonl.py): at start one pass parses and validates every line (so a bad
line stops the run before training, naming file and line), keeping only byte offsets. Samples are rendered
with the chat template when they are read. Truncation to max_seq_len keeps the start of the conversation; a
sample whose supervised tokens were all cut off is dropped at batching time and counted (its loss would be
0/0). Batches are padded only to their longest row.
"""
import torch

from dataset.chat import ChatFormatError, render_chat, validate_messages
from dataset.jsonl import DataError, JsonlIndex, nothing_usable
from dataset.packing import pack_rows
from model.tokenizer import PAD_ID


def conversation_of(obj):
    """The message list of one SFT record, validated (DataError says what is wrong)."""
    key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
    if key is None:
        raise DataError("missing field 'conversations' (or 'messages')")
    try:
        msgs = validate_messages(obj[key])
    except ChatFormatError as e:
        raise DataError(f"field '{key}': {e}") from None
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"field '{key}': the last message must be the assistant's (nothing to learn)")
    return msgs


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, paths, tokenizer, max_seq_len, system_prompt, skip_bad_lines=False,
                 flag="--data_path"):
        self.tokenizer, self.max_seq_len, self.system_prompt = tokenizer, max_seq_len, system_prompt
        self.index = JsonlIndex(paths, flag)
        self.good, bad = self.index.scan(conversation_of, skip_bad_lines)
        self.bad_lines, self.first_bad = bad.count, bad.first
        if len(self.good) == 0:
            raise nothing_usable(self.index.paths, "conversations", bad, flag)

    def __len__(self):
        return len(self.good)

    def render(self, i):
        """(ids, mask) of sample i, truncated to max_seq_len + 1 tokens (inputs and shifted targets)."""
        msgs = conversation_of(self.index[int(self.good[i])])
        ids, mask = render_chat(self.tokenizer, msgs, system_prompt=self.system_prompt)
        return ids[:self.max_seq_len + 1], mask[:self.max_seq_len + 1]

    def __getitem__(self, i):
        ids, mask = self.render(i)
        return {"ids": ids, "mask": mask}


def pad_batch(rows):
    """rows: list of (ids, mask) of length L_i + 1. Returns input_ids, targets, loss_mask of shape
    (B, max L_i), right-padded with PAD_ID and mask 0 (causal attention never looks right, so padding at the
    end cannot change any real position's output)."""
    width = max(len(ids) for ids, _ in rows) - 1
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    targets = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        input_ids[r, :n] = torch.tensor(ids[:-1])
        targets[r, :n] = torch.tensor(ids[1:])
        loss_mask[r, :n] = torch.tensor(mask[1:])  # mask[t+1]: is the token predicted at position t supervised?
    return input_ids, targets, loss_mask


def collate_sft(samples, pack=False):
    """Drop samples with no supervised target left after truncation (counted in n_dropped).
    pack (--pack): the conversations end to end in one row (dataset/packing.py); the batch then also carries
    their lengths, seq_lens."""
    rows = [(s["ids"], s["mask"]) for s in samples if sum(s["mask"][1:]) > 0]
    n_dropped = len(samples) - len(rows)
    if not rows:  # every sample of this micro-batch was truncated away: an empty batch, 0 loss terms
        rows = [([PAD_ID, PAD_ID], [0, 0])]
    if pack:
        input_ids, targets, loss_mask, seq_lens = pack_rows(rows)
        return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "seq_lens": seq_lens,
                "n_dropped": n_dropped}
    input_ids, targets, loss_mask = pad_batch(rows)
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "n_dropped": n_dropped}

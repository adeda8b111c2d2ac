"""DPO preference pairs: a prompt, a chosen answer and a rejected answer, rendered with the chat template.

Accepted line formats:
  MiniMind:  {"chosen": [messages], "rejected": [messages]}  -- both lists share the prompt messages and end
             with the answer (an assistant message);
  TRL:       {"prompt": ..., "chosen": ..., "rejected": ...} -- strings (a user question and two answers) or
             message lists (prompt messages; chosen/rejected as [assistant message]).
The prompt is rendered once (ending in "<s>assistant\\n"); each completion is the answer's tokens plus </s>.
Truncation keeps the whole prompt and the start of each completion; a pair where either completion would be
empty is dropped at batching time and counted.
"""
import torch

from dataset.chat import ChatFormatError, render_chat, validate_messages
from dataset.jsonl import DataError, JsonlIndex, nothing_usable
from dataset.packing import pack_rows
from dataset.sft import pad_batch
from model.tokenizer import PAD_ID


def pair_of(obj):
    """(prompt messages, chosen answer, rejected answer) of one record; DataError if malformed."""
    def as_messages(value, field, answer):
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"field '{field}' is empty")
            return [{"role": "assistant" if answer else "user", "content": value}]
        if isinstance(value, list):
            return value
        raise DataError(f"field '{field}' must be a string or a list of messages")

    if "chosen" not in obj or "rejected" not in obj:
        raise DataError("missing field 'chosen' or 'rejected'")
    if "prompt" in obj:  # TRL's explicit-prompt format
        prompt = as_messages(obj["prompt"], "prompt", answer=False)
        chosen = prompt + as_messages(obj["chosen"], "chosen", answer=True)
        rejected = prompt + as_messages(obj["rejected"], "rejected", answer=True)
    else:                # MiniMind's format: two whole conversations
        chosen = as_messages(obj["chosen"], "chosen", answer=True)
        rejected = as_messages(obj["rejected"], "rejected", answer=True)
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        try:
            validate_messages(msgs)
        except ChatFormatError as e:
            raise DataError(f"field '{field}': {e}") from None
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"field '{field}': must end with the assistant's answer")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("'chosen' and 'rejected' have different prompts (all messages but the last must match)")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise DataError("'chosen' and 'rejected' give the same answer")
    return chosen[:-1], chosen[-1], rejected[-1]


class DPODataset(torch.utils.data.Dataset):
    def __init__(self, paths, tokenizer, max_seq_len, system_prompt, skip_bad_lines=False,
                 flag="--data_path"):
        self.tokenizer, self.max_seq_len, self.system_prompt = tokenizer, max_seq_len, system_prompt
        self.index = JsonlIndex(paths, flag)
        self.good, bad = self.index.scan(pair_of, skip_bad_lines)
        self.bad_lines, self.first_bad = bad.count, bad.first
        if len(self.good) == 0:
            raise nothing_usable(self.index.paths, "preference pairs", bad, flag)
        self.ref_logps = None  # filled by --precompute_ref: (len, 2) float32, chosen and rejected

    def __len__(self):
        return len(self.good)

    def render(self, i):
        """(ids, completion mask) for chosen and rejected of pair i, truncated to max_seq_len + 1 tokens."""
        prompt, chosen, rejected = pair_of(self.index[int(self.good[i])])
        # Only the final answer is the completion (earlier assistant turns belong to the prompt): everything
        # up to and including the last "<s>assistant\n" header is masked out.
        n_prompt = len(render_chat(self.tokenizer, prompt, add_generation_prompt=True,
                                   system_prompt=self.system_prompt)[0])
        out = []
        for answer in (chosen, rejected):
            ids, mask = render_chat(self.tokenizer, prompt + [answer], system_prompt=self.system_prompt)
            mask = [0] * n_prompt + mask[n_prompt:]
            out.append((ids[:self.max_seq_len + 1], mask[:self.max_seq_len + 1]))
        return out

    def __getitem__(self, i):
        (c_ids, c_mask), (r_ids, r_mask) = self.render(i)
        item = {"chosen": (c_ids, c_mask), "rejected": (r_ids, r_mask), "index": i}
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[i]
        return item


def collate_pairs(samples, pack=False):
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones (one forward for both).
    pack (--pack): the 2B sequences end to end in one row instead (dataset/packing.py), in the same order
    (chosen 0..B-1, rejected B..2B-1), so the per-sequence log-probs come out as (2B,) exactly as unpacked.
    Pairs whose chosen or rejected completion was truncated away are dropped (counted in n_dropped). If none
    is left, one all-padding dummy pair keeps the forward/backward (and DDP's gradient sync) going with
    n_pairs = 0, so the loss function can zero it."""
    keep = [s for s in samples if sum(s["chosen"][1][1:]) > 0 and sum(s["rejected"][1][1:]) > 0]
    n_dropped, n_pairs = len(samples) - len(keep), len(keep)
    if not keep:
        dummy = ([PAD_ID, PAD_ID], [0, 0])
        keep = [{"chosen": dummy, "rejected": dummy, "index": -1, "ref_logps": torch.zeros(2)}]
    rows = [s["chosen"] for s in keep] + [s["rejected"] for s in keep]
    batch = {"n_dropped": n_dropped, "n_pairs": n_pairs, "index": torch.tensor([s["index"] for s in keep])}
    if pack:
        batch["input_ids"], batch["targets"], batch["loss_mask"], batch["seq_lens"] = pack_rows(rows)
    else:
        batch["input_ids"], batch["targets"], batch["loss_mask"] = pad_batch(rows)
    if "ref_logps" in samples[0]:
        batch["ref_logps"] = torch.stack([torch.as_tensor(s["ref_logps"]) for s in keep])  # (B, 2)
    return batch

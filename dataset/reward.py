"""Reward-model data: preference pairs, each answer rendered as one whole sequence ending in its </s>.

Accepted line formats:
  the DPO formats (dataset/dpo.py): {"chosen": [messages], "rejected": [messages]} or
             {"prompt": ..., "chosen": ..., "rejected": ...};
  classic RM: {"system": "...", "history": [[question, answer], ...], "question": "...",
             "response_chosen": "...", "response_rejected": "..."}   (system and history optional)
Any of them may carry "margin": a number, how much better chosen is (Llama 2's margin; TRL's margin column).

A sequence is the rendered conversation up to and including the </s> that closes the answer: the reward is
read at that token. A pair where either sequence is longer than max_seq_len is dropped at batching time and
counted (as TRL filters such pairs): cutting it would remove the </s> the reward is read at.
"""
import numbers

import torch

from dataset.chat import ChatFormatError, render_chat, validate_messages
from dataset.dpo import pair_of
from dataset.jsonl import DataError, JsonlIndex, nothing_usable
from model.tokenizer import PAD_ID

RM_FIELDS = ("system", "history", "question", "response_chosen", "response_rejected")


def text_field(obj, field):
    value = obj.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"field '{field}' must be a non-empty string")
    return value


def classic_pair_of(obj):
    """(prompt messages, chosen answer, rejected answer) of a classic RM record; DataError if malformed."""
    messages = []
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError("field 'system' must be a string")
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise DataError("field 'history' must be a list of [question, answer] pairs")
    for i, turn in enumerate(history):
        if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                or not all(isinstance(s, str) and s.strip() for s in turn)):
            raise DataError(f"field 'history': turn {i} must be [question, answer], two non-empty strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": text_field(obj, "question")})
    chosen, rejected = text_field(obj, "response_chosen"), text_field(obj, "response_rejected")
    if chosen == rejected:
        raise DataError("'response_chosen' and 'response_rejected' are the same answer")
    try:
        validate_messages(messages)
    except ChatFormatError as e:
        raise DataError(str(e)) from None
    return messages, {"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected}


def reward_pair_of(obj):
    """(prompt, chosen, rejected, margin) of one record in any accepted format; DataError if malformed."""
    if any(k in obj for k in ("response_chosen", "response_rejected", "question")):
        prompt, chosen, rejected = classic_pair_of(obj)
    elif "chosen" in obj or "rejected" in obj:
        prompt, chosen, rejected = pair_of(obj)
    else:
        raise DataError("not a preference pair: expected 'chosen'/'rejected' (DPO formats) or "
                        "'question'/'response_chosen'/'response_rejected' (reward-model format)")
    margin = obj.get("margin", 0.0)
    if not isinstance(margin, numbers.Real) or isinstance(margin, bool):
        raise DataError(f"field 'margin' must be a number, got {margin!r}")
    return prompt, chosen, rejected, float(margin)


def answer_sequence(tokenizer, messages, system_prompt):
    """Token ids of the conversation up to and including the final answer's </s> (the template adds a "\\n"
    after every </s>: the last supervised token of the render is that </s>)."""
    ids, mask = render_chat(tokenizer, messages, system_prompt=system_prompt)
    last = max(i for i, m in enumerate(mask) if m)
    return ids[:last + 1]


class RewardDataset(torch.utils.data.Dataset):
    def __init__(self, paths, tokenizer, max_seq_len, system_prompt, skip_bad_lines=False, flag="--data_path"):
        self.tokenizer, self.max_seq_len, self.system_prompt = tokenizer, max_seq_len, system_prompt
        self.index = JsonlIndex(paths, flag)
        self.good, bad = self.index.scan(reward_pair_of, skip_bad_lines)
        self.bad_lines, self.first_bad = bad.count, bad.first
        if len(self.good) == 0:
            raise nothing_usable(self.index.paths, "preference pairs", bad, flag)

    def __len__(self):
        return len(self.good)

    def __getitem__(self, i):
        prompt, chosen, rejected, margin = reward_pair_of(self.index[int(self.good[i])])
        c_ids = answer_sequence(self.tokenizer, prompt + [chosen], self.system_prompt)
        r_ids = answer_sequence(self.tokenizer, prompt + [rejected], self.system_prompt)
        return {"chosen": c_ids, "rejected": r_ids, "margin": margin,
                "fits": max(len(c_ids), len(r_ids)) <= self.max_seq_len}


def pad_rows(rows):
    """Right-pad token lists into (N, T) with PAD_ID; also each row's last index (where its reward is read)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
    return input_ids, torch.tensor([len(r) - 1 for r in rows])


def collate_reward_pairs(samples):
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones (one forward for both). Pairs
    too long for max_seq_len are dropped (n_dropped); if none is left, one dummy pair keeps the forward and
    DDP's gradient sync going with n_pairs = 0 (the loss function zeroes it)."""
    keep = [s for s in samples if s["fits"]]
    n_dropped, n_pairs = len(samples) - len(keep), len(keep)
    if not keep:
        keep = [{"chosen": [PAD_ID], "rejected": [PAD_ID], "margin": 0.0}]
    input_ids, last_index = pad_rows([s["chosen"] for s in keep] + [s["rejected"] for s in keep])
    return {"input_ids": input_ids, "last_index": last_index, "margin": torch.tensor([s["margin"] for s in keep]),
            "n_pairs": n_pairs, "n_dropped": n_dropped}

"""Prompts for reinforcement learning (train_ppo.py, train_grpo.py): questions only, the model writes the answers.

Accepted line formats:
  {"prompt": "a user question"}                    TRL's prompt-only format (a string)
  {"prompt": [messages]}                           TRL's conversational form: ends with a user message
  {"conversations": [messages]}                    MiniMind's form: a conversation ending with a user message
Each prompt is rendered with the chat template up to "<s>assistant\\n" (dataset/chat.py), so the model
continues with its answer. Malformed lines stop the run with `file:line: what is wrong` (or are skipped and
counted with --skip_bad_lines); a prompt longer than --max_seq_len leaves no room to answer and is an error too.
"""
import torch

from dataset.chat import ChatFormatError, render_chat, validate_messages
from dataset.jsonl import DataError, JsonlIndex, nothing_usable


def prompt_messages(obj):
    """The messages of one record's prompt (ending with a user turn); DataError if malformed."""
    if "prompt" in obj:
        field, value = "prompt", obj["prompt"]
        if isinstance(value, str):
            if not value.strip():
                raise DataError("field 'prompt' is empty")
            value = [{"role": "user", "content": value}]
    elif "conversations" in obj:
        field, value = "conversations", obj["conversations"]
    else:
        raise DataError("missing field 'prompt' (a question) or 'conversations' (messages ending with a user turn)")
    if not isinstance(value, list):
        raise DataError(f"field '{field}' must be a string or a list of messages")
    try:
        validate_messages(value)
    except ChatFormatError as e:
        raise DataError(f"field '{field}': {e}") from None
    if value[-1]["role"] != "user":
        raise DataError(f"field '{field}': must end with a user message (the question to answer), "
                        f"not {value[-1]['role']!r}")
    return value


class PromptDataset(torch.utils.data.Dataset):
    """dataset[i] -> the token ids of prompt i, rendered up to the assistant header (a list of ints)."""

    def __init__(self, paths, tokenizer, max_seq_len, system_prompt, skip_bad_lines=False, flag="--data_path"):
        self.tokenizer, self.max_seq_len, self.system_prompt = tokenizer, max_seq_len, system_prompt
        self.index = JsonlIndex(paths, flag)
        self.good, bad = self.index.scan(self.checked, skip_bad_lines)
        self.bad_lines, self.first_bad = bad.count, bad.first
        if len(self.good) == 0:
            raise nothing_usable(self.index.paths, "prompts", bad, flag)

    def render(self, messages):
        return render_chat(self.tokenizer, messages, add_generation_prompt=True, system_prompt=self.system_prompt)[0]

    def checked(self, obj):
        messages = prompt_messages(obj)
        n = len(self.render(messages))
        if n >= self.max_seq_len:
            raise DataError(f"the prompt is {n} tokens, leaving no room for an answer in --max_seq_len "
                            f"{self.max_seq_len}: shorten it or raise --max_seq_len")
        return messages

    def __len__(self):
        return len(self.good)

    def __getitem__(self, i):
        return self.render(prompt_messages(self.index[int(self.good[i])]))

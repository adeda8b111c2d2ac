"""Pretraining data: `{"text": ...}` JSONL -> one long token stream -> fixed blocks, no padding.

Each document becomes <s> text </s>; documents are concatenated and the stream is cut into blocks of
max_seq_len + 1 tokens (inputs are the first max_seq_len, targets the last max_seq_len: every position
predicts the next token). Consecutive blocks share one token, so every token is a target exactly once.

A 1.6 GB pretrain_hq.jsonl must not live in Python lists: the stream is tokenised once, streaming, into a
uint16 file under the cache folder and read back through np.memmap (the OS pages it in on demand), so memory
stays flat as the corpus grows. The cache is keyed by the file's path, size, mtime and the tokenizer, so an
edited file or another tokenizer is re-tokenised.
"""
import hashlib
import json
import os

import numpy as np
import torch

from dataset.jsonl import DataError, expand_paths, numbered_lines, parse_line
from model.tokenizer import BOS_ID, EOS_ID


def _cache_key(path, tokenizer):
    st = os.stat(path)
    h = hashlib.sha1()
    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|".encode())
    with open(tokenizer.path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def document_text(obj):
    """The `text` field of one record, validated (DataError says what is wrong)."""
    if "text" not in obj:
        raise DataError("missing field 'text'")
    text = obj["text"]
    if not isinstance(text, str):
        raise DataError(f"field 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError("field 'text' is empty")
    return text


def tokenize_file(path, tokenizer, out_path, skip_bad_lines=False, lines_per_batch=4096):
    """Stream `path` into a uint16 token file at `out_path`; return stats. Bad lines raise DataError with
    `file:line`, or are skipped and counted with skip_bad_lines."""
    if tokenizer.vocab_size > 65535:
        raise ValueError("uint16 token cache needs a vocabulary below 65536")
    stats = {"documents": 0, "tokens": 0, "bad_lines": 0, "first_bad": None}
    tmp = f"{out_path}.tmp{os.getpid()}"

    def flush(texts, out):
        for ids in tokenizer.encode_batch(texts):
            arr = np.array([BOS_ID] + ids + [EOS_ID], dtype=np.uint16)
            out.write(arr.tobytes())
            stats["tokens"] += len(arr)
        stats["documents"] += len(texts)

    with open(tmp, "wb") as out:
        texts = []
        for lineno, line in numbered_lines(path):
            try:
                texts.append(document_text(parse_line(line)))
            except DataError as e:
                err = DataError(f"{path}:{lineno}: {e}")
                if not skip_bad_lines:
                    out.close()
                    os.remove(tmp)
                    raise err from None
                stats["bad_lines"] += 1
                stats["first_bad"] = stats["first_bad"] or str(err)
            if len(texts) >= lines_per_batch:
                flush(texts, out)
                texts = []
        if texts:
            flush(texts, out)
    os.replace(tmp, out_path)
    with open(out_path + ".json", "w") as f:
        json.dump(stats, f)
    return stats


class PretrainDataset(torch.utils.data.Dataset):
    """Blocks of max_seq_len + 1 token ids over the concatenated documents of one or more JSONL files.
    dataset[i] -> {"input_ids": (T,), "targets": (T,)}; no padding anywhere."""

    def __init__(self, paths, tokenizer, max_seq_len, cache_dir, dist=None, skip_bad_lines=False):
        self.max_seq_len = max_seq_len
        self.paths = expand_paths(paths)
        os.makedirs(cache_dir, exist_ok=True)
        caches = []
        for path in self.paths:
            name = f"{os.path.basename(path)}.{_cache_key(path, tokenizer)}.u16"
            caches.append(os.path.join(cache_dir, name))
        # Rank 0 tokenises what is not cached yet; the others wait, then everyone maps the same files.
        if dist is None or dist.is_main:
            for path, cache in zip(self.paths, caches):
                if not os.path.exists(cache):
                    tokenize_file(path, tokenizer, cache, skip_bad_lines)
        if dist is not None:
            dist.barrier()
        self.caches, self._maps = caches, None
        self.stats = []  # per file named (a file named twice appears twice)
        self.block_starts = []  # per file: the number of blocks before it
        n_blocks = 0
        for cache in caches:
            with open(cache + ".json") as f:
                self.stats.append(json.load(f))
            self.block_starts.append(n_blocks)
            n_blocks += max(0, (os.path.getsize(cache) // 2 - 1) // max_seq_len)
        self.n_blocks = n_blocks
        if self.n_blocks == 0:
            raise ValueError(f"{paths}: fewer than {max_seq_len + 1} tokens of text, not even one block")

    @property
    def bad_lines(self):
        return sum(s["bad_lines"] for s in self.stats)

    @property
    def total_tokens(self):
        return sum(s["tokens"] for s in self.stats)

    def __len__(self):
        return self.n_blocks

    def tokens(self, f):
        """File f's token cache, memory-mapped on first use in each process (a memmap sent to a DataLoader
        worker by pickling would be copied whole; reopening it costs nothing)."""
        if self._maps is None:
            self._maps = {}
        if f not in self._maps:
            self._maps[f] = np.memmap(self.caches[f], dtype=np.uint16, mode="r")
        return self._maps[f]

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __getitem__(self, i):
        f = int(np.searchsorted(self.block_starts, i, side="right") - 1)
        start = (i - self.block_starts[f]) * self.max_seq_len
        block = torch.from_numpy(self.tokens(f)[start:start + self.max_seq_len + 1].astype(np.int64))
        return {"input_ids": block[:-1], "targets": block[1:]}


def collate_blocks(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}

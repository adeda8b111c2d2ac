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

from dataset.jsonl import BadLines, DataError, Progress, checked_records, expand_paths
from model.tokenizer import BOS_ID, EOS_ID


def _cache_key(path, tokenizer):
    st = os.stat(path)
    h = hashlib.sha1()
    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(tokenizer.json_text.encode())
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
    """Stream `path` into a uint16 token file at `out_path` and its stats into `out_path`.json; return the
    stats. Bad lines raise DataError with `file:line`, or are skipped and counted with skip_bad_lines.

    Nothing half-written is ever left under those names (Ctrl-C, a bad line, a full disk): both are written
    to temporary files, which are removed on any exit, and renamed into place stats first, tokens last, so
    a token file that exists always has its stats (the cache is looked up by the token file; a stats file
    left alone by an interrupt between the two renames is simply rewritten next time)."""
    if tokenizer.vocab_size > 65535:
        raise ValueError("uint16 token cache needs a vocabulary below 65536")
    stats = {"documents": 0, "tokens": 0, "bad_lines": 0, "first_bad": None}
    bad = BadLines()
    tmp, tmp_stats = f"{out_path}.tmp{os.getpid()}", f"{out_path}.json.tmp{os.getpid()}"

    def flush(texts, out):
        for ids in tokenizer.encode_batch(texts):
            arr = np.array([BOS_ID] + ids + [EOS_ID], dtype=np.uint16)
            out.write(arr.tobytes())
            stats["tokens"] += len(arr)
        stats["documents"] += len(texts)

    try:
        with open(tmp, "wb") as out, Progress(f"tokenising {path}", os.path.getsize(path)) as progress:
            texts = []
            for _, _, text in checked_records(path, document_text, skip_bad_lines, bad, progress):
                texts.append(text)
                if len(texts) >= lines_per_batch:
                    flush(texts, out)
                    texts = []
            flush(texts, out)
        stats["bad_lines"], stats["first_bad"] = bad.count, bad.first
        with open(tmp_stats, "w") as f:
            json.dump(stats, f)
        os.replace(tmp_stats, out_path + ".json")
        os.replace(tmp, out_path)
    finally:
        for leftover in (tmp, tmp_stats):  # still there only if we did not finish
            if os.path.exists(leftover):
                os.remove(leftover)
    return stats


def cache_path(path, tokenizer, cache_dir):
    """Where the token cache of one JSONL file lives: named by its file, size, mtime and the tokenizer."""
    return os.path.join(cache_dir, f"{os.path.basename(path)}.{_cache_key(path, tokenizer)}.u16")


def read_stats(cache):
    with open(cache + ".json") as f:
        return json.load(f)


def ensure_cache(path, cache, tokenizer, skip_bad_lines):
    """Tokenise `path` into `cache` unless an earlier run did. A cache made with --skip_bad_lines holds a
    file with bad lines: without the flag it raises the DataError of the first, as tokenising would."""
    if not os.path.exists(cache):
        tokenize_file(path, tokenizer, cache, skip_bad_lines)
    stats = read_stats(cache)
    if stats["bad_lines"] and not skip_bad_lines:
        raise DataError(stats["first_bad"])


class PretrainDataset(torch.utils.data.Dataset):
    """Blocks of max_seq_len + 1 token ids over the concatenated documents of one or more JSONL files.
    dataset[i] -> {"input_ids": (T,), "targets": (T,)}; no padding anywhere. `flag` is the command-line flag
    the paths came from (--data_path, --eval_path), named in error messages."""

    def __init__(self, paths, tokenizer, max_seq_len, cache_dir, dist=None, skip_bad_lines=False,
                 flag="--data_path"):
        self.max_seq_len = max_seq_len
        self.paths = expand_paths(paths, flag)
        os.makedirs(cache_dir, exist_ok=True)
        caches = [cache_path(path, tokenizer, cache_dir) for path in self.paths]

        def tokenize_missing():
            for path, cache in zip(self.paths, caches):
                ensure_cache(path, cache, tokenizer, skip_bad_lines)
        # Rank 0 tokenises what is not cached yet while the others wait, then everyone maps the same files.
        # main_first hands a bad line's DataError on to the other ranks: it is reported once, by rank 0.
        if dist is None:
            tokenize_missing()
        else:
            dist.main_first(tokenize_missing)

        self.caches, self._maps = caches, None
        self.stats = [read_stats(cache) for cache in caches]  # per file named (a file named twice: twice)
        self.block_starts = []  # per file: the number of blocks before it
        n_blocks = 0
        for cache in caches:
            self.block_starts.append(n_blocks)
            n_blocks += max(0, (os.path.getsize(cache) // 2 - 1) // max_seq_len)
        self.n_blocks = n_blocks
        if self.n_blocks == 0:
            raise DataError(f"{', '.join(self.paths)}: {self.total_tokens} tokens of text, fewer than one block "
                            f"needs ({max_seq_len + 1}): lower --max_seq_len or add text ({flag})")

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

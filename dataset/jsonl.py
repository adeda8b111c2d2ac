"""Reading JSONL files without loading them: path expansion, a byte-offset line index, and errors that name
the file and line.

A 1.6 GB `pretrain_hq.jsonl` has millions of lines. Holding them as Python strings costs several times the
file size in RAM (and is copied into every DataLoader worker). Instead we keep one int64 byte offset per line
in a numpy array (8 bytes a line) and read a line with seek+readline when it is needed.
"""
import glob
import json
import os

import numpy as np


class DataError(ValueError):
    """Bad input data. The message starts with `file:line:` so an editor can jump to it."""


def parse_line(line):
    """One JSONL line (bytes) -> a dict; DataError saying what is wrong (the caller adds file:line)."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def numbered_lines(path):
    """(line number, bytes) of every record line of a file: empty lines are skipped, as in line_offsets."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line != b"\n":
                yield lineno, line


def expand_paths(spec):
    """'a.jsonl,dir/*.jsonl' or a list of such -> existing file paths, each glob sorted.

    A file named again in a later entry is read again: that is how to upsample a small file
    ('sft_*.jsonl,sft_identity.jsonl' reads sft_identity.jsonl twice). Within one glob each file counts once."""
    parts = spec if isinstance(spec, (list, tuple)) else [spec]
    paths = []
    for part in parts:
        for item in str(part).split(","):
            item = item.strip()
            if not item:
                continue
            matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
            if not matches:
                raise FileNotFoundError(f"no file matches {item!r}")
            for m in matches:
                if not os.path.isfile(m):
                    raise FileNotFoundError(f"data file not found: {m}")
                paths.append(m)
    if not paths:
        raise FileNotFoundError(f"no data files in {spec!r}")
    return paths


def line_offsets(path, chunk_size=1 << 24):
    """Byte offsets of the start of every non-empty line, as an int64 array. Reads the file in chunks with
    numpy, so memory stays flat and a GB-sized file is indexed in seconds."""
    starts, pos = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            starts.append(newlines.astype(np.int64) + pos + 1)  # a line starts after each newline
            pos += len(chunk)
    size = pos
    begins = np.concatenate([np.zeros(1, dtype=np.int64)] + starts)
    ends = np.append(begins[1:] - 1, size)                      # the newline (or end of file) after it
    # Empty lines (a blank line between records or at the end) are not records.
    return begins[ends > begins]


class JsonlIndex:
    """Random access to the records of one or more JSONL files.

    index[i] -> (path, line_number, parsed_object); a line that is not valid JSON raises DataError naming
    the file and line. Only the offsets live in memory; file handles are opened lazily per process (so the
    object can be sent to DataLoader workers)."""

    def __init__(self, paths):
        self.paths = expand_paths(paths)
        self.offsets = [line_offsets(p) for p in self.paths]
        self.cum = np.cumsum([0] + [len(o) for o in self.offsets])
        self._files = {}

    def __len__(self):
        return int(self.cum[-1])

    def _locate(self, i):
        file_idx = int(np.searchsorted(self.cum, i, side="right") - 1)
        return file_idx, i - int(self.cum[file_idx])

    def raw(self, i):
        """(path, 1-based line number, bytes of the line)."""
        file_idx, j = self._locate(i)
        path = self.paths[file_idx]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        off = int(self.offsets[file_idx][j])
        f.seek(off)
        line = f.readline()
        # The line number is counted lazily: only error messages need it.
        return path, off, line

    def line_number(self, path, offset):
        with open(path, "rb") as f:
            return f.read(offset).count(b"\n") + 1

    def __getitem__(self, i):
        path, off, line = self.raw(i)
        try:
            return parse_line(line)
        except DataError as e:
            raise DataError(f"{path}:{self.line_number(path, off)}: {e}") from None

    def where(self, i):
        """'file:line' of record i, for error messages."""
        path, off, _ = self.raw(i)
        return f"{path}:{self.line_number(path, off)}"

    def scan(self, check, skip_bad_lines=False):
        """Validate every record in one sequential pass: check(obj) raises DataError(message) for a bad one.
        Returns (indices of the good records, number of bad ones, first bad message). Without skip_bad_lines
        the first bad record raises DataError('file:line: message')."""
        good, bad, first_bad = [], 0, None
        for file_idx, path in enumerate(self.paths):
            k = int(self.cum[file_idx])  # record number of the file's first line
            for lineno, line in numbered_lines(path):
                try:
                    check(parse_line(line))
                    good.append(k)
                except DataError as e:
                    err = DataError(f"{path}:{lineno}: {e}")
                    if not skip_bad_lines:
                        raise err from None
                    bad += 1
                    first_bad = first_bad or str(err)
                k += 1
        return np.array(good, dtype=np.int64), bad, first_bad

    def __getstate__(self):  # file handles do not pickle; each worker opens its own
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def iter_jsonl(paths):
    """Stream (where, object) over every record of the files, in order, one line in memory at a time."""
    for path in expand_paths(paths):
        for lineno, line in numbered_lines(path):
            try:
                obj = parse_line(line)
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            yield f"{path}:{lineno}", obj

"""Reading JSONL files without loading them: path expansion, a byte-offset line index, and errors that name
the file and line.

A 1.6 GB `pretrain_hq.jsonl` has millions of lines. Holding them as Python strings costs several times the
file size in RAM (and is copied into every DataLoader worker). Instead we keep one int64 byte offset per line
in a numpy array (8 bytes a line) and read a line with seek+readline when it is needed.
"""
import difflib
import glob
import json
import os
import sys
import time

import numpy as np


def what_is_there(path, suffix, most=6):
    """For a "not found" message: the `suffix` files in the folder `path` names, closest names first (or in
    `path`, a folder given for a file), so a typo shows next to the right name:
    sft_cedit.jsonl -> " (dataset/demo has: sft_cedict.jsonl, ...)"."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(suffix))
    except FileNotFoundError:
        return f" (no folder {folder})"
    except OSError:              # unreadable: the message stands without the listing
        return ""
    said = f"{path} is a folder; it" if folder == path else folder
    if not names:
        return f" ({said} has no {suffix} file)"
    if folder != path:           # the names closest to the one asked for first: a typo's fix leads
        names = difflib.get_close_matches(os.path.basename(path), names, n=len(names), cutoff=0)
    return f" ({said} has: {', '.join(names[:most])}{', ...' if len(names) > most else ''})"


class DataError(ValueError):
    """Bad input data: a malformed line (the message starts with `file:line:` so an editor can jump to it), a
    missing file, or data with nothing usable in it."""


def parse_line(line):
    """One JSONL line (bytes) -> a dict; DataError saying what is wrong (the caller adds file:line)."""
    line = line.rstrip(b"\r\n")  # else a record cut short is reported at "line 2 column 1", past its newline
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # e's own message says "line 1 column 13": we name the line (file:line), so keep only the column.
        where = "at the end of the line" if e.pos >= len(text) else f"at column {e.colno}"
        raise DataError(f"invalid JSON ({e.msg} {where})") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def is_blank(line):
    """A line of only whitespace holds no record: a blank line between records, or in a Windows (CRLF) file
    a line holding just the carriage return."""
    return not line.strip()


def numbered_lines(path):
    """(line number, bytes) of every non-empty line of a file: exactly the lines line_offsets indexes, so the
    n-th line yielded is record n. Whitespace-only lines are yielded too (and counted as records) because
    line_offsets cannot cheaply tell them apart; every reader skips them with is_blank."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line != b"\n":
                yield lineno, line


class BadLines:
    """The lines skipped with --skip_bad_lines: how many, and the first one's message (to show the user)."""

    def __init__(self):
        self.count, self.first = 0, None

    def add(self, error):
        self.count += 1
        self.first = self.first or str(error)


def checked_records(path, check, skip_bad_lines=False, bad=None, progress=None):
    """Yield (record number, line number, check(parsed object)) for every record of one file, in order.

    Record numbers count the non-empty lines from 0 (JsonlIndex's numbering). Whitespace-only lines are
    skipped. A bad line (not JSON, or check raises DataError) raises DataError('file:line: message'); with
    skip_bad_lines it is counted in `bad` (a BadLines) instead. `progress` (a Progress) hears of every byte."""
    for k, (lineno, line) in enumerate(numbered_lines(path)):
        if progress is not None:
            progress.update(len(line))
        if is_blank(line):
            continue
        try:
            value = check(parse_line(line))
        except DataError as e:
            error = DataError(f"{path}:{lineno}: {e}")
            if not skip_bad_lines:
                raise error from None
            bad.add(error)
            continue
        yield k, lineno, value


class Progress:
    """Progress of a long pass over data, counted in bytes, on stderr and on rank 0 only (N ranks would
    print N copies). On a terminal: a tqdm bar, shown only if the pass lasts over two seconds. Otherwise (a
    log file, a cluster's output): one line every `interval` seconds with the rate and the time left, so a
    log shows the job is alive and how long it will take."""

    def __init__(self, desc, total_bytes, interval=10.0):
        from trainer.cli import is_main_rank  # lazily: trainer imports dataset
        self.desc, self.total, self.interval = desc, total_bytes, interval
        self.done, self.bar = 0, None
        self.enabled = is_main_rank()
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(desc=desc, total=total_bytes, unit="B", unit_scale=True, delay=2, leave=False,
                            file=sys.stderr, dynamic_ncols=True)
        self.start = self.last_report = time.monotonic()

    def update(self, nbytes):
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.enabled and time.monotonic() - self.last_report >= self.interval:
            self.report()

    def report(self):
        self.last_report = now = time.monotonic()
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"{self.desc}: {self.done / 1e6:,.0f} of {self.total / 1e6:,.0f} MB, {rate / 1e6:.1f} MB/s, "
              f"about {eta:,.0f} s left", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def expand_paths(spec, flag="--data_path"):
    """'a.jsonl,dir/*.jsonl' or a list of such -> existing file paths, each glob sorted. `flag` is the
    command-line flag the spec came from, named in the error for a missing file.

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
                raise DataError(f"{flag} {item}: no file matches this pattern")
            for m in matches:
                if not os.path.isfile(m):
                    raise DataError(f"{flag} {m}: no such data file{what_is_there(m, '.jsonl')}")
                paths.append(m)
    if not paths:
        raise DataError(f"{flag} {spec!r}: names no data file")
    return paths


def nothing_usable(paths, what, bad, flag="--data_path"):
    """The DataError for data that holds no usable record, saying why (bad: the BadLines skipped)."""
    where = ", ".join(paths)
    if bad.count:
        return DataError(f"{where}: no usable {what}: all {bad.count} records were bad lines (first: {bad.first})")
    return DataError(f"{where}: no usable {what}: the file holds no records (check {flag})")


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
    # Empty lines are not records. Whitespace-only lines ("\r\n") stay, as in numbered_lines: readers skip them.
    return begins[ends > begins]


class JsonlIndex:
    """Random access to the records of one or more JSONL files.

    index[i] -> (path, line_number, parsed_object); a line that is not valid JSON raises DataError naming
    the file and line. Only the offsets live in memory; file handles are opened lazily per process (so the
    object can be sent to DataLoader workers)."""

    def __init__(self, paths, flag="--data_path"):
        self.paths = expand_paths(paths, flag)
        self.offsets = [line_offsets(p) for p in self.paths]
        self.cum = np.cumsum([0] + [len(o) for o in self.offsets])
        self._files = {}

    def __len__(self):
        return int(self.cum[-1])

    def _locate(self, i):
        file_idx = int(np.searchsorted(self.cum, i, side="right") - 1)
        return file_idx, i - int(self.cum[file_idx])

    def raw(self, i):
        """(path, byte offset of the line, bytes of the line)."""
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
        Returns (indices of the good records, BadLines). Blank lines are neither good nor bad. Without
        skip_bad_lines the first bad record raises DataError('file:line: message')."""
        good, bad = [], BadLines()
        total = sum(os.path.getsize(p) for p in self.paths)
        with Progress("checking data", total) as progress:
            for file_idx, path in enumerate(self.paths):
                first = int(self.cum[file_idx])  # index of the file's first record
                for k, _, _ in checked_records(path, check, skip_bad_lines, bad, progress):
                    good.append(first + k)
        return np.array(good, dtype=np.int64), bad

    def __getstate__(self):  # file handles do not pickle; each worker opens its own
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def iter_jsonl(paths, flag="--data_path"):
    """Stream (where, object) over every record of the files, in order, one line in memory at a time."""
    for path in expand_paths(paths, flag):
        for _, lineno, obj in checked_records(path, lambda obj: obj):
            yield f"{path}:{lineno}", obj

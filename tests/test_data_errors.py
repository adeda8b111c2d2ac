"""Data mistakes a user makes every day, and what they see: one line naming the file, the line and the fix,
the same under torchrun; blank and Windows (CRLF) lines; no half-written token cache; no clobbered tokenizer."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dataset.dpo import DPODataset
from dataset.jsonl import DataError, JsonlIndex, Progress, expand_paths, iter_jsonl
from dataset.pretrain import PretrainDataset
from dataset.sft import SFTDataset
from model.tokenizer import Tokenizer
from tests.conftest import ROOT
from tests.helpers import TINY, run_script

USER, ANSWER = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
CONVERSATION = json.dumps({"conversations": [USER, ANSWER]})
PAIR = json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def write_lines(path, lines, newline="\n"):
    """Write lines (str) as given: bytes untouched, so tests control blank lines and line endings exactly."""
    with open(path, "wb") as f:
        f.write("".join(line + newline for line in lines).encode("utf-8"))
    return str(path)


def texts(n, bad_line=None, bad='{"text": "broken"'):
    """n pretraining lines; line number `bad_line` (1-based) replaced by a malformed one."""
    return [bad if i == bad_line else json.dumps({"text": f"document {i}: some words"}) for i in range(1, n + 1)]


# ---- blank lines and Windows line endings -------------------------------------------------------------------

def test_crlf_file_with_blank_lines_loads_as_its_documents(tmp_path, tok):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"text":"a"}\r\n\r\n{"text":"b"}\r\n')
    data = PretrainDataset(str(path), tok, 2, str(tmp_path / "cache"))
    assert data.stats[0]["documents"] == 2 and data.bad_lines == 0
    assert [where for where, _ in iter_jsonl(str(path))] == [f"{path}:1", f"{path}:3"]


def test_whitespace_lines_are_skipped_and_line_numbers_stay_right(tmp_path, tok):
    """Blank lines of every kind between SFT records: the records around them are still found by index,
    and a bad line after them is reported at its true line number."""
    lines = ["", " \t", CONVERSATION, "\r", json.dumps({"messages": [USER, ANSWER]}), "  ", CONVERSATION]
    path = write_lines(tmp_path / "sft.jsonl", lines, newline="\r\n")
    data = SFTDataset(path, tok, 64, None)
    assert len(data) == 3 and data.bad_lines == 0
    assert [data.index.where(int(i)) for i in data.good] == [f"{path}:3", f"{path}:5", f"{path}:7"]
    assert all(data.render(i) == data.render(0) for i in range(3))  # each index reads a real record

    write_lines(path, lines + ["", '{"conversations": []}'])
    with pytest.raises(DataError, match=rf"^{path}:9: field 'conversations'"):
        SFTDataset(path, tok, 64, None)


def test_invalid_json_names_our_line_and_the_decoders_column_only(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [CONVERSATION, "", '{"text": "a" "b"}'])
    with pytest.raises(DataError) as e:
        JsonlIndex(path).scan(lambda obj: obj)
    assert str(e.value) == f"{path}:3: invalid JSON (Expecting ',' delimiter at column 14)"


def test_non_utf8_bytes_name_the_byte_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        list(iter_jsonl(str(path)))
    assert str(e.value) == f"{path}:2: not valid UTF-8 (byte 0xe9 at column 14)"


# ---- whole-file mistakes: one line with the fix ---------------------------------------------------------------

def test_missing_data_file_names_the_flag_and_path(tmp_path):
    write_lines(tmp_path / "a.jsonl", texts(1))
    missing = f"--data_path {tmp_path}/nope.jsonl: no such data file ({tmp_path} has: a.jsonl)"
    with pytest.raises(DataError, match=f"^{re.escape(missing)}$"):
        expand_paths(f"{tmp_path}/a.jsonl,{tmp_path}/nope.jsonl")
    folder = f"--data_path {tmp_path}: no such data file ({tmp_path} is a folder; it has: a.jsonl)"
    with pytest.raises(DataError, match=f"^{re.escape(folder)}$"):
        expand_paths(str(tmp_path))
    with pytest.raises(DataError, match=re.escape(f"(no folder {tmp_path}/no)")):
        expand_paths(f"{tmp_path}/no/a.jsonl")
    for name in ("b.jsonl", "sft_cedict.jsonl", "sft_wordnet.jsonl"):
        write_lines(tmp_path / name, texts(1))
    with pytest.raises(DataError, match=re.escape(f"({tmp_path} has: sft_cedict.jsonl, sft_wordnet.jsonl,")):
        expand_paths(f"{tmp_path}/sft_cedit.jsonl")           # a typo: the closest names first, not a.jsonl
    with pytest.raises(DataError, match=r"^--eval_path .*/\*.json: no file matches"):
        SFTDataset(f"{tmp_path}/*.json", None, 64, None, flag="--eval_path")


def test_files_with_nothing_usable_say_why(tmp_path, tok):
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  ", "\r"])
    with pytest.raises(DataError, match=r"no usable conversations: the file holds no records \(check --data_path\)"):
        SFTDataset(blank, tok, 64, None)
    bad = write_lines(tmp_path / "bad.jsonl", [CONVERSATION, PAIR.replace("Go away.", "Hello.")])
    with pytest.raises(DataError, match=rf"no usable preference pairs: all 2 records were bad lines "
                                        rf"\(first: {bad}:1: missing field 'chosen'"):
        DPODataset(bad, tok, 64, None, skip_bad_lines=True)
    short = write_lines(tmp_path / "short.jsonl", texts(2))
    with pytest.raises(DataError, match=r"fewer than one block needs \(513\): lower --max_seq_len"):
        PretrainDataset(short, tok, 512, str(tmp_path / "cache"))


# ---- the token cache ------------------------------------------------------------------------------------------

def test_cache_made_with_skip_bad_lines_still_stops_a_run_without_it(tmp_path, tok):
    path = write_lines(tmp_path / "a.jsonl", texts(30, bad_line=21))
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError) as fresh:
        PretrainDataset(path, tok, 4, cache)
    assert str(fresh.value) == f"{path}:21: invalid JSON (Expecting ',' delimiter at the end of the line)"
    assert PretrainDataset(path, tok, 4, cache, skip_bad_lines=True).bad_lines == 1  # now cached
    with pytest.raises(DataError) as cached:
        PretrainDataset(path, tok, 4, cache)
    assert str(cached.value) == str(fresh.value)
    assert PretrainDataset(path, tok, 4, cache, skip_bad_lines=True).bad_lines == 1


def test_a_failed_tokenisation_leaves_no_cache_files(tmp_path, tok):
    path = write_lines(tmp_path / "a.jsonl", texts(30, bad_line=21))
    with pytest.raises(DataError):
        PretrainDataset(path, tok, 4, str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []


def test_ctrl_c_while_tokenising_leaves_no_partial_cache(tmp_path):
    """SIGINT in the middle of tokenising a big file: exit 130, one 'interrupted' line, and nothing in the
    cache folder that a later run could mistake for a finished cache."""
    path = write_lines(tmp_path / "big.jsonl", (json.dumps({"text": f"{i} " + "文本 words here " * 40})
                                                for i in range(30000)))  # ~22 MB: tokenising takes many seconds
    cache = tmp_path / "cache"
    cmd = [sys.executable, "train_pretrain.py", *TINY, "--data_path", path, "--cache_dir", str(cache),
           "--out_dir", str(tmp_path / "out"), "--device", "cpu", "--no_progress", "--max_steps", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (cache.exists() and any(".tmp" in n for n in os.listdir(cache))):
        time.sleep(0.05)
    assert proc.poll() is None, "tokenising finished before it could be interrupted: use a bigger file"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert os.listdir(cache) == []


# ---- progress of long passes ----------------------------------------------------------------------------------

def test_progress_off_a_terminal_is_a_line_with_rate_and_time_left(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with Progress("tokenising big.jsonl", total_bytes=10_000_000, interval=0) as progress:
        progress.update(4_000_000)
    line = capsys.readouterr().err.strip()
    assert line.startswith("tokenising big.jsonl: 4 of 10 MB, ") and "MB/s" in line and "s left" in line

    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 reports
    with Progress("tokenising big.jsonl", total_bytes=10_000_000, interval=0) as progress:
        progress.update(4_000_000)
    assert capsys.readouterr().err == ""


# ---- under torchrun: the first error, once ----------------------------------------------------------------------

def assert_reported_once(proc, message):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(message) == 1, out[-5000:]
    assert "Connection closed by peer" not in out, out[-5000:]
    # torchrun reports failed children with a traceback of its own, in torch's files; none may be in ours.
    frames = re.findall(r'File "([^"]+)"', out)
    assert [f for f in frames if "site-packages" not in f and not f.startswith("<")] == [], out[-5000:]


def test_bad_pretrain_line_under_torchrun_is_reported_once(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", texts(40, bad_line=21))
    proc = run_script("train_pretrain.py", *TINY, "--data_path", path, "--out_dir", tmp_path / "out",
                      "--device", "cpu", "--no_progress", nproc=2, check=False, timeout=300)
    assert_reported_once(proc, f"train_pretrain.py: error: {path}:21: invalid JSON")
    assert os.listdir(tmp_path / "out" / "cache") == []


def test_bad_sft_line_under_torchrun_is_reported_once(tmp_path):
    """SFT reads its data with the tokenizer of the checkpoint it starts from, so it needs one first."""
    from model import ModelConfig, Transformer
    from trainer.checkpoint import atomic_save, model_payload
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400))
    atomic_save(model_payload(model, "pretrain", 0), str(tmp_path / "pretrain_64.pth"))
    path = write_lines(tmp_path / "bad.jsonl", [CONVERSATION] * 4 + ['{"conversations": [}'])
    proc = run_script("train_full_sft.py", "--data_path", path, "--out_dir", tmp_path, "--device", "cpu",
                      nproc=2, check=False, timeout=300)
    assert_reported_once(proc, f"train_full_sft.py: error: {path}:5: invalid JSON")


def test_bad_dpo_line_under_torchrun_is_reported_once(tmp_path):
    """DPO reads its data after joining the process group: every rank finds the bad line, none hangs."""
    from model import ModelConfig, Transformer
    from trainer.checkpoint import atomic_save, model_payload
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400))
    atomic_save(model_payload(model, "full_sft", 0), str(tmp_path / "full_sft_64.pth"))
    path = write_lines(tmp_path / "bad.jsonl", [PAIR] * 4 + [PAIR.replace("Go away.", "Hello.")])
    proc = run_script("train_dpo.py", "--dim", "64", "--data_path", path, "--out_dir", tmp_path,
                      "--device", "cpu", nproc=2, check=False, timeout=300)
    assert_reported_once(proc, f"train_dpo.py: error: {path}:5: 'chosen' and 'rejected' give the same answer")


# ---- the tokenizer trainer does not overwrite a tokenizer by default ------------------------------------------------

def test_train_tokenizer_default_run_never_overwrites(tmp_path):
    script = os.path.join(ROOT, "train_tokenizer.py")
    data = write_lines(tmp_path / "corpus.jsonl", texts(2000))
    first = subprocess.run([sys.executable, script, "--data_path", data, "--vocab_size", "300"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    written = (tmp_path / "out" / "tokenizer.json").read_bytes()
    assert len(json.loads(written)["model"]["vocab"]) == 300

    again = subprocess.run([sys.executable, script, "--data_path", data, "--vocab_size", "280"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip() == ("train_tokenizer.py: error: out/tokenizer.json exists: "
                                    "pass --out PATH to overwrite it or to write elsewhere")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == written

    named = subprocess.run([sys.executable, script, "--data_path", data, "--vocab_size", "280",
                            "--out", "out/tokenizer.json"], cwd=tmp_path, capture_output=True, text=True)
    assert named.returncode == 0, named.stderr
    assert len(json.loads((tmp_path / "out" / "tokenizer.json").read_bytes())["model"]["vocab"]) == 280

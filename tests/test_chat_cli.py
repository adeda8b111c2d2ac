"""eval_model.py as a terminal program: Ctrl-C / Ctrl-D / commands in a real pseudo-terminal, stdout holding
only the answers, the context limit, the sampling seed, MiniMind2's tokenizer names and one-line user errors."""
import codecs
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

from model.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKEN_NAMES, Tokenizer, TokenizerError
from tests.conftest import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}  # dumb: readline sends no escape sequences


@pytest.fixture(scope="module")
def out_dir(tiny_pretrained, tmp_path_factory):
    """out_dir with the tiny pretrained model also posing as the SFT model (MiniMind2-style renaming)."""
    out = tmp_path_factory.mktemp("chat")
    shutil.copy(tiny_pretrained / "pretrain_64.pth", out / "pretrain_64.pth")
    shutil.copy(tiny_pretrained / "pretrain_64.pth", out / "full_sft_64.pth")
    return out


def chat(out_dir, *args, stdin=""):
    """eval_model.py with prompts piped in: (returncode, stdout, stderr). Bytes in and out, so that no "\r" is
    added or removed on the way (text=True would translate line ends)."""
    proc = subprocess.run([sys.executable, "eval_model.py", "--out_dir", str(out_dir), *map(str, args)],
                          input=stdin.encode(), capture_output=True, cwd=ROOT, env=ENV, timeout=120)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


class Terminal:
    """eval_model.py on a pseudo-terminal, as a person at a keyboard runs it. pty.fork makes the terminal the
    child's controlling terminal, so typing \\x03 makes the terminal driver send SIGINT, as Ctrl-C does."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become eval_model.py
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "eval_model.py", *map(str, args)], ENV)
        self.seen = ""     # everything the terminal showed so far (stdout and stderr together)
        # Incremental: a read may end in the middle of a multi-byte character (readline echoes byte by byte).
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def expect(self, pattern, timeout=60):
        """Read until `pattern` (a regex) appears after what earlier calls consumed; return the text up to it."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.seen)):
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {pattern!r}; the terminal showed:\n{self.seen}")
            try:
                self.seen += self._decoder.decode(os.read(self.fd, 4096))
            except OSError:  # the child exited and closed the terminal
                raise AssertionError(f"no {pattern!r} before the program ended:\n{self.seen}") from None
        before, self.seen = self.seen[:match.end()], self.seen[match.end():]
        return before

    def type(self, keys):
        os.write(self.fd, keys.encode())

    def exit_status(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining the terminal so the child never blocks on a full buffer
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.seen += self._decoder.decode(os.read(self.fd, 4096))
            except OSError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s:\n{self.seen}")

    def close(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


PROMPT = r"(^|\n)> $"


def test_terminal_ctrl_c_commands_ctrl_d(out_dir):
    # Greedy text continuation from the tiny model loops on a character for the whole --max_new_tokens, so
    # the answer is still streaming when Ctrl-C comes.
    term = Terminal("--out_dir", out_dir, "--model_mode", "0", "--temperature", "0", "--max_seq_len", "20000",
                    "--max_new_tokens", "20000")
    try:
        term.expect("/help")
        term.expect(PROMPT)
        term.type("half a line")
        term.expect("half a line")                      # readline has it (and is waiting for more keys) ...
        time.sleep(0.2)
        term.type("\x03")                               # ... and Ctrl-C at the prompt drops it,
        term.expect(PROMPT)
        term.type("/clear\r")                           # ... so this line is "/clear", not "half a line/clear"
        term.expect(r"\[conversation cleared\]")
        term.expect(PROMPT)
        term.type("你好\r")
        term.expect(r"你好\r?\n.{20}", timeout=30)      # the answer is streaming
        term.type("\x03")
        shown = term.expect(r"\[stopped; this exchange is left out of the conversation\]")
        assert "tokens/s]" not in shown, "the answer ended before Ctrl-C: make it longer"
        term.expect(PROMPT)                             # back at the prompt, the program still running
        term.type("/help\r")
        shown = term.expect(PROMPT)
        assert "/clear" in shown and "/exit" in shown and "Ctrl-C stops an answer" in shown
        term.type("\x04")                               # Ctrl-D at the prompt: a newline, then exit 0
        assert term.exit_status() == 0
        assert term.seen.startswith("\r\n") or term.seen.startswith("\n"), repr(term.seen)
        assert "Traceback" not in term.seen
    finally:
        term.close()


def test_piped_stdout_holds_only_answers_and_crlf_is_stripped(out_dir):
    rc, out, err = chat(out_dir, "--seed", 1, "--max_new_tokens", 12, stdin="你好\r\nWhat is your name?\r\n")
    assert rc == 0, err
    # The status lines are on stderr: the header, the echoed prompts, one "[n tokens, ...]" per answer.
    assert "full_sft_64.pth: 0.51M parameters" in err and "seed 1" in err and err.count("tokens/s]") == 2
    assert "> 你好\n" in err and "\r" not in err + out  # the echo shows what the model got: "你好", not "你好\r"
    assert not re.search(r"parameters|tokens/s|^> ", out, re.M), out
    assert len(out.splitlines()) >= 2 and out.endswith("\n")


def test_seed_repeats_a_run_and_no_seed_differs(out_dir):
    prompts = "你好\nWhat is your name?\n「学习」是什么意思？\n"
    args = ("--temperature", 1.0, "--top_p", 1.0, "--max_new_tokens", 30)
    runs = [chat(out_dir, *args, stdin=prompts) for _ in range(2)]
    seeds = [int(re.search(r"seed (\d+)", err).group(1)) for _, _, err in runs]
    assert seeds[0] != seeds[1] and runs[0][1] != runs[1][1], "two runs without --seed gave the same answers"
    # The printed seed is the one that was used: --seed with it gives the first run's answers again.
    again = chat(out_dir, *args, "--seed", seeds[0], stdin=prompts)
    assert again[0] == 0 and again[1] == runs[0][1] and len(again[1].strip()) > 10


def test_long_history_drops_the_oldest_exchanges_with_a_note(out_dir):
    questions = ["What does the word water mean?", "How do you say book in Chinese?", "「学习」是什么意思？",
                 "请背诵李白的《静夜思》。", "Define the word happy."]
    rc, out, err = chat(out_dir, "--history_cnt", 20, "--max_new_tokens", 40, "--temperature", 1.0, "--seed", 2,
                        stdin="\n".join(questions) + "\n")
    assert rc == 0 and err.count("tokens/s]") == len(questions), err
    assert re.search(r"\[dropped the oldest \d exchange\(s\) to fit the context of 128 tokens\]", err), err
    # With --history_cnt 0 (the default) nothing is remembered, so nothing needs dropping.
    rc, out, err = chat(out_dir, "--max_new_tokens", 40, "--temperature", 1.0, stdin="\n".join(questions) + "\n")
    assert rc == 0 and "dropped" not in err


def test_over_long_prompt_is_refused_and_the_chat_goes_on(out_dir):
    from dataset.chat import DEFAULT_SYSTEM_PROMPT, render_chat
    long_prompt = "很长的问题 " * 30
    n = len(render_chat(Tokenizer(), [{"role": "user", "content": long_prompt}], add_generation_prompt=True,
                        system_prompt=DEFAULT_SYSTEM_PROMPT)[0])
    rc, out, err = chat(out_dir, "--max_new_tokens", 8, stdin=f"{long_prompt}\n你好\n")
    assert rc == 0, err
    refusals = [line for line in err.splitlines() if "refused" in line]
    assert refusals == [f"[prompt refused: it is {n} tokens with the chat template; the context is 128 tokens, 8 "
                        "of them kept for the answer. Shorten it, or lower --max_new_tokens]"]
    assert err.count("tokens/s]") == 1  # the next prompt is answered
    # --max_seq_len (MiniMind2's flag) sets the context: a large one lets the same prompt through.
    rc, out, err = chat(out_dir, "--max_new_tokens", 8, "--max_seq_len", n + 8, stdin=f"{long_prompt}\n")
    assert rc == 0 and "refused" not in err and err.count("tokens/s]") == 1, err


def byte_level_bpe(path, special_tokens):
    """A tiny byte-level BPE tokenizer.json with the given special tokens at ids 0, 1, 2."""
    from tokenizers import decoders, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["你好，世界", "hello world", "assistant user system"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


def test_minimind2_later_special_token_names_are_accepted(tmp_path):
    from dataset.chat import render_chat
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert names in SPECIAL_TOKEN_NAMES
    tok = Tokenizer(byte_level_bpe(tmp_path / "tokenizer.json", names))
    ids, _ = render_chat(tok, [{"role": "user", "content": "你好"}], add_generation_prompt=True, system_prompt=None)
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 2 and ids.count(EOS_ID) == 1   # the same ids 1 and 2
    assert tok.decode(ids) == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert EOS_ID not in tok.encode("<|im_end|>")   # typed text stays text, under these names too
    with pytest.raises(TokenizerError, match=r"ids 0, 1, 2 are \['<pad>', '<bos>', '<eos>'\]"):
        Tokenizer(byte_level_bpe(tmp_path / "other.json", ["<pad>", "<bos>", "<eos>"]))


def test_minimind2_renamed_tokenizer_chats_like_ours(out_dir, tmp_path):
    """The bundled tokenizer.json with MiniMind2's later names: the same ids, so the same answers."""
    import json
    from model.tokenizer import DEFAULT_TOKENIZER, SPECIAL_TOKENS
    with open(DEFAULT_TOKENIZER, encoding="utf-8") as f:
        spec = json.load(f)
    for old, new in zip(SPECIAL_TOKENS, SPECIAL_TOKEN_NAMES[1]):
        spec["model"]["vocab"][new] = spec["model"]["vocab"].pop(old)
        next(t for t in spec["added_tokens"] if t["content"] == old)["content"] = new
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    # A checkpoint written before tokenizers travelled inside checkpoints (an imported MiniMind2 .pth is one
    # too): --tokenizer_path chooses its tokenizer. (One that carries a tokenizer refuses another one.)
    import torch
    old = tmp_path / "old"
    old.mkdir()
    ckpt = torch.load(out_dir / "full_sft_64.pth", weights_only=False)
    del ckpt["tokenizer"]
    torch.save(ckpt, old / "full_sft_64.pth")
    prompts = "你好\nWhat is your name?\n"
    ours = chat(old, "--seed", 5, "--max_new_tokens", 20, "--history_cnt", 2, stdin=prompts)
    theirs = chat(old, "--seed", 5, "--max_new_tokens", 20, "--history_cnt", 2,
                  "--tokenizer_path", tmp_path / "tokenizer.json", stdin=prompts)
    assert ours[0] == theirs[0] == 0, theirs[2]
    # The same ids were sampled; a special id inside an answer shows under the file's own name.
    their_answers = theirs[1]
    for ours_name, their_name in zip(SPECIAL_TOKENS, SPECIAL_TOKEN_NAMES[1]):
        their_answers = their_answers.replace(their_name, ours_name)
    assert ours[1] == their_answers and len(ours[1].strip()) > 5


@pytest.fixture(scope="module")
def two_checkpoints(out_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    shutil.copy(out_dir / "full_sft_64.pth", out / "full_sft_64.pth")
    shutil.copy(out_dir / "full_sft_64.pth", out / "full_sft_128.pth")
    return out


@pytest.mark.parametrize("args,message", [
    (["--out_dir", "{empty}"], "no full_sft checkpoint in {empty}"),
    (["--out_dir", "{two}"], "several full_sft checkpoints in {two}"),
    (["--checkpoint", "{empty}/nope.pth"], "checkpoint not found: {empty}/nope.pth"),
    (["--dim", "768"], "checkpoint not found: {out}/full_sft_768.pth"),
    (["--temperature", "-1"], "argument --temperature: must be a number >= 0, got -1"),
    (["--top_p", "0"], "argument --top_p: must be in (0, 1], got 0"),
    (["--top_p", "1.5"], "argument --top_p: must be in (0, 1], got 1.5"),
    (["--temperature", "warm"], "argument --temperature: must be a number >= 0, got warm"),
    (["--max_new_tokens", "0"], "argument --max_new_tokens: must be a positive integer, got 0"),
    (["--history_cnt", "-2"], "argument --history_cnt: must be 0 or a positive integer"),
    (["--model_mode", "3"], "argument --model_mode: invalid choice: 3"),
    (["--tokenizer_path", "{empty}/tokenizer.json"], "tokenizer file not found: {empty}/tokenizer.json"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_user_mistakes_are_one_line_and_exit_2(out_dir, two_checkpoints, tmp_path, args, message):
    import torch
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    where = {"empty": tmp_path, "two": two_checkpoints, "out": out_dir}
    args = [a.format(**where) for a in args]
    rc, out, err = chat(out_dir, *args) if "--out_dir" not in args else chat(tmp_path, *args)
    assert rc == 2 and out == "", (rc, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("eval_model.py: error: ") and message.format(**where) in err, err


def test_help_keeps_the_examples_and_explains_every_flag():
    proc = subprocess.run([sys.executable, "eval_model.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, "COLUMNS": "120"}, timeout=60)
    assert proc.returncode == 0
    text = proc.stdout
    assert "\n    echo 你好 | python eval_model.py > answers.txt" in text   # the examples keep their lines
    flags = re.findall(r"^  (--\w+)(.*)\n((?:   +\S.*\n)*)", text, re.M)
    assert len(flags) >= 18
    for flag, rest, more in flags:
        help_text = re.sub(r"^ ?[A-Z_{},0-9]* ?", "", rest).strip() + more
        assert help_text.strip(), f"{flag} has no help text"
        assert help_text.count("default") <= 1, f"{flag} shows its default twice: {help_text}"
    assert "counted as in MiniMind2" in text and "(default: None)" not in text

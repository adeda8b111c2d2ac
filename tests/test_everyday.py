"""Everyday use: one-line user errors (no traceback, exit 2), --resume that refuses a different run, runs that
learnt nothing, checkpoints that are never overwritten by accident, wandb without a key, --help, Ctrl-C."""
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers import TINY, read_log, run_script


def assert_one_line_error(proc, *fragments):
    """A user mistake: exit status 2, exactly one line on stderr that names it, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and " error: " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def tiny(out_dir, *extra):
    return [*TINY, "--max_seq_len", "64", "--batch_size", "8", "--learning_rate", "3e-3", "--warmup_iters", "2",
            "--out_dir", out_dir, "--log_interval", "1", "--no_progress", "--device", "cpu", *extra]


@pytest.mark.parametrize("flags,fragments", [
    (["--log_interval", "0"], ["--log_interval", "positive integer"]),
    (["--batch_size", "0"], ["--batch_size", "positive integer"]),
    (["--batch_size", "abc"], ["--batch_size: must be a positive integer, got abc"]),   # not "invalid positive_int"
    (["--learning_rate", "-1"], ["--learning_rate", "> 0"]),
    (["--learning_rate", "inf"], ["--learning_rate: must be a number > 0, got inf"]),
    (["--dtype", "float16"], ["float16 needs a CUDA device"]),
    (["--dtype", "half"], ["invalid choice: 'half'"]),
    (["--device", "cuda"], ["CUDA is not available", "--device cpu"]),
    (["--device", "gpu"], ["'gpu' is not a device"]),
    (["--dim", "65"], ["--dim 65 must be divisible by --n_heads"]),
    (["--no_such_flag"], ["unrecognized arguments: --no_such_flag"]),
    (["--resume"], ["--resume: no resume file"]),
])
def test_bad_flags_give_one_line(tmp_path, flags, fragments):
    args = [a for a in tiny(str(tmp_path), "--max_steps", "1") if a not in ("--device", "cpu")] \
        if "--device" in flags else tiny(str(tmp_path), "--max_steps", "1")
    assert_one_line_error(run_script("train_pretrain.py", *args, *flags, check=False), *fragments)


def test_debug_shows_the_traceback(tmp_path):
    proc = run_script("train_pretrain.py", *tiny(str(tmp_path), "--dim", "65", "--debug"), check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_help_keeps_line_breaks_and_shows_each_default_once():
    out = run_script("train_pretrain.py", "--help").stdout
    assert "\n    python train_pretrain.py   " in out                 # the usage examples keep their layout
    assert "(default: None)" not in out and out.count("(default: {out_dir}/cache)") == 1
    flat = " ".join(out.split())                                   # argparse wraps lines at the terminal width
    for flag, shown in [("--seed", "(default: 42)"), ("--epochs", "(default: 1)"), ("--dim", "pretraining: 512")]:
        entry = flat.split(f"{flag} {flag[2:].upper()} ", 1)[1].split(" --", 1)[0]   # "--seed SEED <help>"
        assert shown in entry, (flag, entry)


def test_resume_refuses_a_different_run_and_warns_about_the_rest(tmp_path):
    out = str(tmp_path)
    run_script("train_pretrain.py", *tiny(out, "--max_steps", "6", "--save_interval", "3"))
    changed = [(["--learning_rate", "1e-3"], "--learning_rate 0.001 differs from 0.003"),
               (["--max_steps", "8"], "--max_steps 8 differs from 6"),
               (["--data_path", "dataset/demo/pretrain_poetry.jsonl"], "differs from dataset/demo/pretrain_*.jsonl")]
    for flags, message in changed:
        proc = run_script("train_pretrain.py", *tiny(out, "--max_steps", "6", "--resume", *flags), check=False)
        assert_one_line_error(proc, message, "without --resume")
    proc = run_script("train_pretrain.py", *tiny(out, "--max_steps", "6", "--resume", "--batch_size", "4"), check=False)
    assert_one_line_error(proc, "the global batch is 4", "made with 8")
    proc = run_script("train_pretrain.py", *tiny(out, "--max_steps", "6", "--resume", "--grad_clip", "0.5"))
    assert "warning: --resume with --grad_clip 0.5 (the run was started with 1.0)" in proc.stdout


def test_resume_names_the_one_config_field_that_differs(tmp_path):
    out = str(tmp_path)
    run_script("train_pretrain.py", *tiny(out, "--max_steps", "2"))
    ckpt = torch.load(tmp_path / "pretrain_64_resume.pth", weights_only=False)
    ckpt["config"]["n_kv_heads"] = 4
    torch.save(ckpt, tmp_path / "pretrain_64_resume.pth")
    proc = run_script("train_pretrain.py", *tiny(out, "--max_steps", "2", "--resume"), check=False)
    assert_one_line_error(proc, "holds another model (n_kv_heads 4 in the file vs 2 now)")


def test_a_run_that_learns_nothing_stops_and_saves_nothing(tmp_path, tiny_pretrained):
    out = tmp_path / "out"
    shutil.copytree(tiny_pretrained, out)
    # A 16-token context: the default system prompt alone fills it, so no answer token survives truncation.
    proc = run_script("train_full_sft.py", "--out_dir", out, "--max_seq_len", "16", "--max_steps", "30",
                      "--no_progress", "--device", "cpu", check=False)
    assert_one_line_error(proc, "nothing was learnt: 10 of 10 steps were skipped", "raise --max_seq_len")
    assert not (out / "full_sft_64.pth").exists()


def test_init_from_is_never_overwritten(tmp_path, tiny_pretrained):
    out = tmp_path / "out"
    shutil.copytree(tiny_pretrained, out)
    shutil.copy(out / "pretrain_64.pth", out / "full_sft_64.pth")
    before = (out / "full_sft_64.pth").read_bytes()
    proc = run_script("train_full_sft.py", "--out_dir", out, "--init_from", out / "full_sft_64.pth", "--max_steps", "2",
                      "--no_progress", "--device", "cpu", check=False)
    assert_one_line_error(proc, "is also this run's output", "--save_name")
    assert (out / "full_sft_64.pth").read_bytes() == before


def test_later_stages_find_the_single_checkpoint_or_say_which_exist(tmp_path, tiny_sft):
    """After `make demo` (dim 128), `python train_dpo.py --out_dir out` must not look for full_sft_512.pth."""
    out = tmp_path / "out"
    shutil.copytree(tiny_sft, out)
    proc = run_script("train_dpo.py", "--out_dir", out, "--max_steps", "1", "--batch_size", "2", "--max_seq_len", "128",
                      "--data_path", "dataset/demo/dpo_identity.jsonl", "--no_progress", "--device", "cpu")
    assert f"initialised from {out}/full_sft_64.pth" in proc.stdout
    proc = run_script("train_dpo.py", "--out_dir", out, "--dim", "512", "--max_steps", "1", check=False)
    assert_one_line_error(proc, f"{out}/full_sft_512.pth", f"{out}/full_sft_64.pth", "drop --dim")
    shutil.copy(out / "full_sft_64.pth", out / "full_sft_32.pth")
    proc = run_script("train_dpo.py", "--out_dir", out, "--max_steps", "1", check=False)
    assert_one_line_error(proc, "several full_sft checkpoints", "--dim (32, 64)")


def test_dpo_logs_its_dpo_and_nll_parts(tmp_path, tiny_sft):
    out = tmp_path / "out"
    shutil.copytree(tiny_sft, out)
    run_script("train_dpo.py", "--out_dir", out, "--max_steps", "2", "--batch_size", "4", "--max_seq_len", "128",
               "--sft_weight", "0.5", "--data_path", "dataset/demo/dpo_identity.jsonl", "--log_interval", "1",
               "--no_progress", "--device", "cpu")
    first = read_log(out / "rlhf_64_log.jsonl")[0]
    assert abs(first["loss/dpo"] - math.log(2)) < 1e-5            # policy == reference at step 0
    assert first["loss/nll"] > 0.5
    assert abs(first["loss"] - (first["loss/dpo"] + 0.5 * first["loss/nll"])) < 1e-4


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_on_sigmoid_is_trls_conservative_dpo(eps):
    """TRL: losses = -logsigmoid(beta*h)*(1-eps) - logsigmoid(-beta*h)*eps (trl/trainer/dpo_trainer.py),
    computed here in plain Python floats."""
    from trainer.losses import dpo_loss
    pc, pr, rc, rr = [-10.0, -12.5, -3.0], [-11.0, -9.0, -3.5], [-10.5, -12.0, -2.0], [-10.0, -10.0, -4.0]
    beta = 0.5
    losses, _, _ = dpo_loss(*map(torch.tensor, (pc, pr, rc, rr)), beta, "sigmoid", eps)

    def logsigmoid(x):
        return -math.log1p(math.exp(-x))
    for i in range(3):
        h = (pc[i] - pr[i]) - (rc[i] - rr[i])
        want = -logsigmoid(beta * h) * (1 - eps) - logsigmoid(-beta * h) * eps
        assert abs(losses[i].item() - want) < 1e-6
    with pytest.raises(ValueError, match="not to loss_type 'hinge'"):
        dpo_loss(*map(torch.tensor, (pc, pr, rc, rr)), beta, "hinge", eps)


def test_label_smoothing_with_hinge_is_refused_on_the_command_line(tmp_path):
    proc = run_script("train_dpo.py", "--out_dir", tmp_path, "--loss_type", "hinge", "--label_smoothing", "0.1",
                      check=False)
    assert_one_line_error(proc, "--label_smoothing has no effect with --loss_type hinge")


def test_wandb_without_a_key_logs_offline_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), OMP_NUM_THREADS="1")   # no ~/.netrc, no key
    proc = subprocess.run([sys.executable, "train_pretrain.py", *tiny(str(tmp_path / "out"), "--max_steps", "2",
                                                                       "--use_wandb")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb: no API key is set up" in proc.stderr and "Traceback" not in proc.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_ctrl_c_says_it_stops_after_the_step(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train_pretrain.py", *tiny(str(out), "--max_steps", "100000")], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:          # wait until training runs
        if "step 3/" in line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "stopping after this step and saving (Ctrl-C again to stop at once)" in stderr
    assert "resume with the same command plus --resume" in stdout and "Traceback" not in stderr
    assert (out / "pretrain_64_resume.pth").exists() and not list(out.glob("*.tmp*"))


def test_a_second_ctrl_c_stops_at_once(monkeypatch):
    """Unit test of the handler: the first signal asks for a stop after the step; a repeat within a second is
    torchrun forwarding the same Ctrl-C; a later one raises KeyboardInterrupt at once."""
    from trainer import loop
    now = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    stop = loop.StopRequest()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        now[0] += 0.5
        os.kill(os.getpid(), signal.SIGINT)           # the launcher's copy of the same Ctrl-C: ignored
        now[0] += 2.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

"""FSDP2 (--fsdp) on CPU with gloo, 2 processes: the same run as DDP (losses and checkpoint), for pretraining
and for DPO (whose frozen reference is sharded too), and a bit-exact resume after Ctrl-C."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from tests.conftest import ROOT
from tests.helpers import TINY, read_log, run_script


def pretrain_args(out_dir, *extra):
    return [*TINY, "--max_seq_len", "64", "--batch_size", "4", "--learning_rate", "3e-3", "--warmup_iters", "2",
            "--out_dir", out_dir, "--log_interval", "1", "--no_progress", "--device", "cpu", *extra]


def test_fsdp_pretraining_equals_ddp(tmp_path):
    args = ["--max_steps", "8", "--accumulation_steps", "2"]   # accumulation: no gradient sync on micro-step 1
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "ddp"), *args), nproc=2)
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "fsdp"), *args, "--fsdp"), nproc=2)
    # Activation checkpointing inside the sharded blocks: the blocks are recomputed in the backward pass.
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "fsdp_ac"), *args, "--fsdp", "--grad_checkpointing"),
               nproc=2)
    ddp = [r["loss"] for r in read_log(tmp_path / "ddp" / "pretrain_64_log.jsonl")]
    fsdp = [r["loss"] for r in read_log(tmp_path / "fsdp" / "pretrain_64_log.jsonl")]
    fsdp_ac = [r["loss"] for r in read_log(tmp_path / "fsdp_ac" / "pretrain_64_log.jsonl")]
    assert len(ddp) == len(fsdp) == len(fsdp_ac) == 8 and ddp[-1] < ddp[0]
    np.testing.assert_allclose(fsdp, ddp, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fsdp_ac, ddp, rtol=0, atol=1e-5)
    # The checkpoint is gathered to full tensors: the same file as without FSDP (keys, shapes, values).
    a = torch.load(tmp_path / "ddp" / "pretrain_64.pth", weights_only=False)
    b = torch.load(tmp_path / "fsdp" / "pretrain_64.pth", weights_only=False)
    assert a["model"].keys() == b["model"].keys() and a["config"] == b["config"]
    for k in a["model"]:
        assert type(b["model"][k]) is torch.Tensor and b["model"][k].shape == a["model"][k].shape
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-5)


def test_fsdp_dpo_equals_ddp(tmp_path, tiny_sft):
    for name in ("ddp", "fsdp"):
        shutil.copytree(tiny_sft, tmp_path / name)
        run_script("train_dpo.py", "--out_dir", tmp_path / name, "--max_steps", "8", "--batch_size", "2",
                   "--max_seq_len", "128", "--learning_rate", "1e-3", "--data_path", "dataset/demo/dpo_identity.jsonl",
                   "--log_interval", "1", "--no_progress", "--device", "cpu", *(["--fsdp"] if name == "fsdp" else []),
                   nproc=2)
    ddp, fsdp = (read_log(tmp_path / name / "rlhf_64_log.jsonl") for name in ("ddp", "fsdp"))
    for key in ("loss", "rewards/margins", "rewards/chosen"):
        np.testing.assert_allclose([r[key] for r in fsdp], [r[key] for r in ddp], rtol=0, atol=1e-5)
    assert abs(ddp[0]["loss"] - np.log(2)) < 1e-6 and ddp[-1]["loss"] < ddp[0]["loss"]


def test_fsdp_resume_after_ctrl_c_equals_the_uninterrupted_run(tmp_path):
    args = ["--max_steps", "150", "--save_interval", "1000", "--fsdp"]
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "full"), *args), nproc=2)
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_pretrain.py",
           *pretrain_args(str(out), *args)]
    # A new session: the Ctrl-C below goes to torchrun and both workers, as a terminal's would.
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    log_path = out / "pretrain_64_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log_path.exists() and len(log_path.read_text().splitlines()) >= 10):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    stopped_at = torch.load(out / "pretrain_64_resume.pth", weights_only=False)["step"]
    assert 10 <= stopped_at < 150, err.decode()[-2000:]
    run_script("train_pretrain.py", *pretrain_args(str(out), *args, "--resume"), nproc=2)
    full, resumed = read_log(tmp_path / "full" / "pretrain_64_log.jsonl"), read_log(log_path)
    assert [r["step"] for r in resumed] == list(range(150))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    a = torch.load(tmp_path / "full" / "pretrain_64.pth", weights_only=False)["model"]
    b = torch.load(out / "pretrain_64.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_needs_torchrun(tmp_path):
    proc = run_script("train_pretrain.py", *pretrain_args(str(tmp_path), "--max_steps", "1", "--fsdp"), check=False)
    assert proc.returncode == 2 and "--fsdp shards the model over processes" in proc.stderr


def test_fsdp_lora_dpo_equals_ddp_lora_dpo(tmp_path, tiny_sft):
    """The combination that fits a 72B DPO on 8 GPUs (bench/memory_plan.py): sharded base + adapters, the
    reference being the base with the adapters off."""
    for name in ("ddp", "fsdp"):
        shutil.copytree(tiny_sft, tmp_path / name)
        run_script("train_dpo.py", "--out_dir", tmp_path / name, "--max_steps", "6", "--batch_size", "2",
                   "--max_seq_len", "128", "--learning_rate", "1e-2", "--lora_rank", "4", "--merge_lora",
                   "--data_path", "dataset/demo/dpo_identity.jsonl", "--log_interval", "1", "--no_progress",
                   "--device", "cpu", *(["--fsdp"] if name == "fsdp" else []), nproc=2)
    ddp, fsdp = (read_log(tmp_path / name / "lora" / "rlhf_64_log.jsonl") for name in ("ddp", "fsdp"))
    np.testing.assert_allclose([r["loss"] for r in fsdp], [r["loss"] for r in ddp], rtol=0, atol=1e-5)
    assert abs(ddp[0]["loss"] - np.log(2)) < 1e-6 and ddp[-1]["loss"] < ddp[0]["loss"] - 0.01
    a, b = (torch.load(tmp_path / name / "rlhf_64.pth", weights_only=False)["model"] for name in ("ddp", "fsdp"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)

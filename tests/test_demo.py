"""`make demo` at a toy size: every stage's checkpoint, metrics log, the report and the plot, consistent."""
import json
import os
import sys
import subprocess

import torch

from tests.conftest import ROOT

TOY = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--max_seq_len", "64",
       "--pretrain_steps", "6", "--sft_steps", "4", "--dpo_steps", "3", "--samples_max_new_tokens", "4"]


def run_demo(out, *extra):
    proc = subprocess.run([sys.executable, "demo.py", "--out_dir", str(out), *TOY, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_pipeline_at_toy_size(tmp_path):
    out = tmp_path / "out"
    first = run_demo(out)
    for stage, steps in (("pretrain", 6), ("full_sft", 4), ("rlhf", 3)):
        ckpt = torch.load(out / f"{stage}_32.pth", weights_only=False)
        assert ckpt["step"] == steps and ckpt["config"]["dim"] == 32 and ckpt["stage"] == stage
        with open(out / f"{stage}_32_log.jsonl") as f:
            log = [json.loads(line) for line in f]
        assert [r["step"] for r in log if "loss" in r][-1] == steps - 1
    # SFT started from the pretrained weights and DPO from the SFT weights (the chain is real).
    assert torch.load(out / "rlhf_32.pth", weights_only=False)["dpo"]["init_from"] == str(out / "full_sft_32.pth")
    report = (out / "demo_report.md").read_text(encoding="utf-8")
    assert report in first                                   # printed and saved
    for needle in ("| pretrain |", "| full_sft |", "| rlhf |", "Identity flip rate", "KL(DPO", "eval_model.py"):
        assert needle in report, needle
    assert (out / "demo_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Run again: finished stages are skipped, the report is rebuilt.
    second = run_demo(out)
    assert second.count("is up to date, skipped") == 3
    # ... and says which times come from the earlier run, and how to call the Python it ran in.
    assert second.count(" s (earlier run) |") == 3 and "(pretrain, full_sft, rlhf skipped: up to date)" in second
    chat = next(line for line in second.splitlines() if "eval_model.py --out_dir" in line)
    # the path itself, not the file it links to: a venv's python links to a base Python that lacks torch
    assert os.path.normpath(os.path.join(ROOT, chat.split()[0])) == os.path.abspath(sys.executable), chat
    # Different flags for a stage: it and every later stage run again.
    third = run_demo(out, "--sft_steps", "5")
    assert "== pretrain: " in third and "skipped" in third.split("== full_sft")[0]
    assert "python train_full_sft.py" in third and "python train_dpo.py" in third
    assert "--data_path 'dataset/demo/pretrain_*.jsonl'" in first     # quoted: the printed command can be pasted

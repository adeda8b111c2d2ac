"""Pretraining data and the shared training loop, end to end on CPU."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dataset.jsonl import DataError
from dataset.pretrain import PretrainDataset
from dataset.sampler import BatchPlan
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from tests.conftest import ROOT
from tests.helpers import TINY, read_log, run_script, write_jsonl
from trainer.checkpoint import config_from_checkpoint
from trainer.cli import UserError
from trainer.schedule import lr_at


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_packing_has_no_padding_and_keeps_every_document_in_order(tmp_path, tok):
    docs = [f"document {i}: " + "词语 word " * (i % 7 + 1) for i in range(60)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    data = PretrainDataset(str(tmp_path / "a.jsonl"), tok, 16, str(tmp_path / "cache"))
    stream = []
    for d in docs:
        stream += [BOS_ID] + tok.encode(d) + [EOS_ID]
    assert len(data) == (len(stream) - 1) // 16
    rebuilt = []
    for i in range(len(data)):
        x, y = data[i]["input_ids"], data[i]["targets"]
        assert x.shape == y.shape == (16,)
        assert torch.equal(x[1:], y[:-1])          # targets are the inputs shifted by one
        assert PAD_ID not in x.tolist()
        rebuilt += x.tolist()
    assert rebuilt == stream[:len(rebuilt)]        # every document, in order, nothing skipped or padded
    assert len(stream) - len(rebuilt) <= 16


@pytest.mark.parametrize("line,message", [
    ('{"text": "ok"', "invalid JSON"),
    ('{"txt": "no text field"}', "missing field 'text'"),
    ('{"text": ""}', "field 'text' is empty"),
    ('{"text": 42}', "must be a string"),
    ('["a list"]', "expected a JSON object"),
])
def test_bad_line_names_file_and_line(tmp_path, tok, line, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "fine"}, {"text": "also fine"}, line, {"text": "after"}])
    with pytest.raises(DataError) as e:
        PretrainDataset(str(path), tok, 4, str(tmp_path / "cache"))
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
    data = PretrainDataset(str(path), tok, 4, str(tmp_path / "cache2"), skip_bad_lines=True)
    assert data.bad_lines == 1


def test_batch_plan_shards_partition_the_global_batch():
    one = BatchPlan(100, 8, 1, 1, 0, seed=3)
    two = [BatchPlan(100, 4, 1, 2, r, seed=3) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 12
    for epoch in range(2):
        for a, b, c in zip(one.micro_batches(epoch), two[0].micro_batches(epoch), two[1].micro_batches(epoch)):
            assert a == b + c
    assert one.micro_batches(0) != one.micro_batches(1)                    # reshuffled each epoch
    assert one.micro_batches(1, first_step=5) == one.micro_batches(1)[5:]  # resume position
    assert sorted(i for b in one.micro_batches(0) for i in b) == sorted(np.random.default_rng([3, 0]).permutation(100)[:96])


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[10] == 1e-3 == max(lrs)                     # peak exactly the learning rate
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warmup
    assert abs(lrs[-1] - 1e-4) < 1e-12                     # cosine down to lr/10
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def pretrain_args(out_dir, *extra):
    return [*TINY, "--max_seq_len", "64", "--batch_size", "8", "--learning_rate", "3e-3", "--warmup_iters", "5",
            "--out_dir", out_dir, "--log_interval", "1", "--no_progress", "--device", "cpu", *extra]


def test_short_pretrain_lowers_the_loss_and_saves_config(tmp_path):
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path), "--max_steps", "60"))
    log = read_log(tmp_path / "pretrain_64_log.jsonl")
    assert [r["step"] for r in log] == list(range(60))
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert first > 8.0 and last < first - 1.5, (first, last)
    ckpt = torch.load(tmp_path / "pretrain_64.pth", weights_only=False)
    assert ckpt["config"]["dim"] == 64 and ckpt["config"]["n_layers"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    with pytest.raises(UserError, match="--dim 768 conflicts with the checkpoint .* dim=64"):
        config_from_checkpoint(ckpt, "pretrain_64.pth", {"dim": 768})


def test_two_process_torchrun_matches_one_process(tmp_path):
    """Same global batch (2 x 4 vs 1 x 8): the same per-step losses, up to float summation order."""
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "one"), "--max_steps", "8"))
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "two"), "--max_steps", "8", "--batch_size", "4"),
               nproc=2)
    one = [r["loss"] for r in read_log(tmp_path / "one" / "pretrain_64_log.jsonl")]
    two = [r["loss"] for r in read_log(tmp_path / "two" / "pretrain_64_log.jsonl")]
    assert len(one) == len(two) == 8
    np.testing.assert_allclose(two, one, rtol=1e-4)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    steps = 200   # enough that the Ctrl-C below lands well inside the run
    args = ["--max_steps", str(steps), "--save_interval", "1000"]
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "full"), *args))
    full = read_log(tmp_path / "full" / "pretrain_64_log.jsonl")

    out = tmp_path / "cut"
    cmd = [sys.executable, "train_pretrain.py", *pretrain_args(str(out), *args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log_path = out / "pretrain_64_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log_path.exists() and len(log_path.read_text().splitlines()) >= 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)            # like Ctrl-C, or a cluster's preemption signal
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    stopped_at = torch.load(out / "pretrain_64_resume.pth", weights_only=False)["step"]
    assert 20 <= stopped_at < steps
    run_script("train_pretrain.py", *pretrain_args(str(out), *args, "--resume"))
    resumed = read_log(log_path)
    assert [r["step"] for r in resumed] == list(range(steps))
    # Bit-exact on CPU float32: the same losses, not merely close ones; the counters carry on.
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["tokens"] for r in resumed] == [r["tokens"] for r in full]
    a = torch.load(tmp_path / "full" / "pretrain_64.pth", weights_only=False)["model"]
    b = torch.load(out / "pretrain_64.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_skips_the_step_and_never_touches_the_weights(tmp_path):
    """A loss that turns NaN is counted and skipped: no NaN ever reaches the weights, training goes on."""
    from model import ModelConfig, Transformer
    from trainer.distributed import DistInfo
    from trainer.loop import Stage, run_training
    from trainer.losses import language_model_loss
    from trainer.precision import setup_precision
    from trainer.args import base_parser

    data = [{"input_ids": torch.randint(3, 100, (8,)), "targets": torch.randint(3, 100, (8,))} for _ in range(16)]
    calls = {"n": 0}

    def poisoned(model, batch, autocast):
        loss, n, m = language_model_loss(model, batch, autocast)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), n, m

    args = base_parser("", stage="t", lr=1e-2, epochs=1, batch_size=4, max_seq_len=8, data_path="").parse_args(
        ["--out_dir", str(tmp_path), "--no_progress", "--log_interval", "1"])
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=100))
    stage = Stage("t", data, lambda s: {k: torch.stack([x[k] for x in s]) for k in s[0]}, poisoned, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_training(model, stage, args, dist, setup_precision("float32", dist.device))
    log = read_log(tmp_path / "t_32_log.jsonl")
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 1]
    assert log[2]["grad_norm"] is None
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_file_named_twice_is_read_twice(tmp_path, tok):
    from dataset.jsonl import JsonlIndex, expand_paths
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "three"}])
    assert expand_paths(f"{tmp_path}/*.jsonl") == [f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl"]
    spec = f"{tmp_path}/*.jsonl,{tmp_path}/b.jsonl"     # upsample b
    assert len(JsonlIndex(spec)) == 4
    assert PretrainDataset(spec, tok, 2, str(tmp_path / "cache")).total_tokens == \
        PretrainDataset(f"{tmp_path}/*.jsonl", tok, 2, str(tmp_path / "cache")).total_tokens + len(tok.encode("three")) + 2


def test_wandb_offline_logs_and_the_run_id_is_kept_for_resume(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "out"), "--max_steps", "3", "--use_wandb",
                                                   "--wandb_project", "tinymind-test"), env=env)
    run_id = torch.load(tmp_path / "out" / "pretrain_64_resume.pth", weights_only=False)["wandb_id"]
    assert run_id
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_dataloader_workers_give_the_same_run(tmp_path):
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "w0"), "--max_steps", "4"))
    run_script("train_pretrain.py", *pretrain_args(str(tmp_path / "w2"), "--max_steps", "4", "--num_workers", "2"))
    w0, w2 = (read_log(tmp_path / n / "pretrain_64_log.jsonl") for n in ("w0", "w2"))
    assert [r["loss"] for r in w0] == [r["loss"] for r in w2]

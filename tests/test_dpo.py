"""DPO: the loss against TRL's own numbers, the frozen reference, the data format, and the stage end to end."""
import contextlib
import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from dataset.dpo import DPODataset, collate_pairs
from dataset.jsonl import DataError
from model import ModelConfig, Transformer
from model.tokenizer import Tokenizer
from tests.conftest import ROOT
from tests.helpers import read_log, run_script, write_jsonl
from trainer.losses import dpo_loss, sequence_logps

DATA = os.path.join(ROOT, "tests", "data")  # copies of ../shared/fixtures/*_trl.json (TRL 1.16.0's numbers)


def load(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("loss_key", ["sigmoid", "ipo", "hinge", "robust[label_smoothing=0.1]", "sigmoid_norm"])
def test_losses_match_trl(case, loss_key):
    c = load("dpo_losses_trl.json")["cases"][case]
    x = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in c["inputs"].items()}
    loss_type, _, eps = loss_key.partition("[label_smoothing=")
    losses, chosen_r, rejected_r = dpo_loss(
        x["policy_chosen_logps"], x["policy_rejected_logps"], x["ref_chosen_logps"], x["ref_rejected_logps"],
        x["beta"], loss_type, float(eps.rstrip("]") or 0), x["chosen_lengths"].float(), x["rejected_lengths"].float())
    want = c["expected"][loss_key]
    torch.testing.assert_close(losses, torch.tensor(want["losses"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen_r, torch.tensor(want["chosen_rewards"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected_r, torch.tensor(want["rejected_rewards"]), atol=1e-5, rtol=0)
    if loss_type == "sigmoid":
        assert abs(losses[0].item() - math.log(2)) < 1e-6   # pair 0: policy == reference


def test_sequence_logps_and_full_step_match_trl():
    d = load("dpo_logps_trl.json")
    ids = torch.tensor(d["inputs"]["input_ids"])
    mask = torch.tensor(d["inputs"]["completion_mask"])
    logits, ref_logits = torch.tensor(d["inputs"]["logits"]), torch.tensor(d["inputs"]["ref_logits"])
    # Position t-1 predicts token t: drop the last logit and the first target.
    logps = sequence_logps(logits[:, :-1], ids[:, 1:], mask[:, 1:])
    torch.testing.assert_close(logps, torch.tensor(d["expected"]["sequence_logps"]), atol=1e-5, rtol=0)
    assert mask[:, 1:].sum(-1).tolist() == d["expected"]["completion_lengths"]

    ref = sequence_logps(ref_logits[:, :-1], ids[:, 1:], mask[:, 1:])
    (pc, pr), (rc, rr) = logps.chunk(2), ref.chunk(2)
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, d["inputs"]["beta"])
    m = d["expected"]["dpo"]["metrics"]
    assert abs(losses.mean().item() - d["expected"]["dpo"]["loss"]) < 1e-5
    for name, ours in [("rewards/chosen", cr.mean()), ("rewards/rejected", rjr.mean()),
                       ("rewards/accuracies", (cr > rjr).float().mean()), ("rewards/margins", (cr - rjr).mean()),
                       ("logps/chosen", pc.mean()), ("logps/rejected", pr.mean())]:
        assert abs(ours.item() - m[name]) < 1e-5, name


def test_gradients_reach_only_the_policy():
    from train_dpo import make_dpo_step
    torch.manual_seed(0)
    policy = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    tok = Tokenizer()
    data = DPODataset(os.path.join(ROOT, "dataset/demo/dpo_identity.jsonl"), tok, 64, None)
    batch = collate_pairs([data[i] for i in range(4)])

    class Args:
        beta, loss_type, label_smoothing, sft_weight = 0.1, "sigmoid", 0.0, 0.5
    step = make_dpo_step(reference, Args)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(3):
        loss, n, _ = step(policy, batch, contextlib.nullcontext)
        loss.backward()
        assert all(p.grad is not None for p in policy.parameters())
        assert all(p.grad is None for p in reference.parameters())
        opt.step()
        opt.zero_grad()
    after = reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)          # bit-identical
    assert any(not torch.equal(before[k], policy.state_dict()[k]) for k in before)


U = {"role": "user", "content": "Who are you?"}
A = {"role": "assistant", "content": "I am Deep TinyMind."}
B = {"role": "assistant", "content": "I am TinyMind."}


@pytest.mark.parametrize("row,error", [
    ({"chosen": [U, A], "rejected": [{"role": "user", "content": "Other?"}, B]}, "different prompts"),
    ({"chosen": [U, A]}, "missing field 'chosen' or 'rejected'"),
    ({"chosen": [U, A], "rejected": [U, A]}, "same answer"),
    ({"chosen": [U], "rejected": [U, B]}, "field 'chosen': must end with the assistant's answer"),
    ({"chosen": [A, U, A], "rejected": [A, U, B]}, "field 'chosen': message 0: expected role 'user'"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string or a list"),
])
def test_malformed_pairs_give_file_line_errors(tmp_path, row, error):
    path = tmp_path / "dpo.jsonl"
    write_jsonl(path, [{"chosen": [U, A], "rejected": [U, B]}, row])
    with pytest.raises(DataError) as e:
        DPODataset(str(path), Tokenizer(), 64, None)
    assert str(e.value).startswith(f"{path}:2: ") and error in str(e.value), str(e.value)


def test_formats_masks_and_truncation(tmp_path):
    tok = Tokenizer()
    path = tmp_path / "dpo.jsonl"
    long_answer = {"role": "assistant", "content": "很长的回答" * 100}
    write_jsonl(path, [
        {"chosen": [U, A], "rejected": [U, B]},                                        # MiniMind
        {"prompt": "Who are you?", "chosen": "I am Deep TinyMind.", "rejected": "I am TinyMind."},  # TRL strings
        {"prompt": [U], "chosen": [A], "rejected": [B]},                               # TRL messages
        {"chosen": [U, A, U, A], "rejected": [U, A, U, B]},                            # multi-turn prompt
        {"chosen": [{"role": "user", "content": "问题" * 200}, A], "rejected": [{"role": "user", "content": "问题" * 200}, B]},
        {"chosen": [U, long_answer], "rejected": [U, B]},
    ])
    data = DPODataset(str(path), tok, 64, None)
    for i in range(3):   # the three formats render identically
        assert data.render(i) == data.render(0)
    (c_ids, c_mask), (r_ids, r_mask) = data.render(0)
    assert tok.decode([t for t, m in zip(c_ids, c_mask) if m]) == "I am Deep TinyMind.</s>"
    assert tok.decode([t for t, m in zip(r_ids, r_mask) if m]) == "I am TinyMind.</s>"
    (c_ids, c_mask), _ = data.render(3)  # only the LAST answer is the completion
    assert tok.decode([t for t, m in zip(c_ids, c_mask) if m]) == "I am Deep TinyMind.</s>"
    (c_ids, c_mask), _ = data.render(5)  # truncation keeps the prompt and the start of the completion
    assert len(c_ids) == 65 and c_ids[:10] == data.render(0)[0][0][:10] and sum(c_mask) > 0
    batch = collate_pairs([data[i] for i in (0, 4, 5)])
    assert batch["n_dropped"] == 1 and batch["n_pairs"] == 2    # the pair whose prompt fills the context
    assert batch["input_ids"].shape == (4, 64)                 # 2 chosen then 2 rejected, padded to longest


def dpo_args(out_dir, *extra):
    return ["--dim", "64", "--max_seq_len", "128", "--out_dir", out_dir, "--log_interval", "1", "--no_progress",
            "--device", "cpu", "--batch_size", "8", *extra]


def test_dpo_run_starts_at_ln2_and_raises_accuracy_and_margin(tmp_path, tiny_sft):
    out = tmp_path / "out"
    shutil.copytree(tiny_sft, out)
    run_script("train_dpo.py", *dpo_args(str(out), "--data_path", "dataset/demo/dpo_identity.jsonl",
                                         "--max_steps", "27", "--learning_rate", "1e-3"))
    log = read_log(out / "rlhf_64_log.jsonl")
    assert log[0]["loss"] == round(math.log(2), 6) and log[0]["rewards/accuracies"] == 0.0
    assert log[0]["rewards/margins"] == 0.0
    last = log[-5:]
    assert np.mean([r["rewards/accuracies"] for r in last]) > 0.8
    assert np.mean([r["rewards/margins"] for r in last]) > 0.5
    assert np.mean([r["loss"] for r in last]) < 0.5
    assert torch.load(out / "rlhf_64.pth", weights_only=False)["stage"] == "rlhf"


def test_precomputed_reference_equals_live(tmp_path, tiny_sft):
    for name, extra in (("live", []), ("pre", ["--precompute_ref"])):
        shutil.copytree(tiny_sft, tmp_path / name)
        run_script("train_dpo.py", *dpo_args(str(tmp_path / name), "--max_steps", "6", "--learning_rate", "1e-3",
                                             "--data_path", "dataset/demo/dpo_wordnet.jsonl",
                                             "--eval_path", "dataset/demo/dpo_identity.jsonl", *extra))
    live, pre = (read_log(tmp_path / n / "rlhf_64_log.jsonl") for n in ("live", "pre"))
    steps = lambda log: [r for r in log if "loss" in r]
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
        np.testing.assert_allclose([r[key] for r in steps(pre)], [r[key] for r in steps(live)], rtol=1e-4, atol=1e-5)
    evals = lambda log: [r["eval_loss"] for r in log if "phase" in r]
    assert abs(evals(live)[0] - math.log(2)) < 1e-6           # held-out pairs: ln 2 before any step
    np.testing.assert_allclose(evals(pre), evals(live), rtol=1e-5)
    assert len(os.listdir(tmp_path / "pre" / "cache")) >= 1


def test_two_process_dpo_matches_one_process(tmp_path, tiny_sft):
    """Packed (--pack, as make demo runs it): each rank lays its own share of the pairs in one row."""
    for name, nproc, bs in (("one", 0, "8"), ("two", 2, "4")):
        shutil.copytree(tiny_sft, tmp_path / name)
        run_script("train_dpo.py", *dpo_args(str(tmp_path / name), "--max_steps", "4", "--learning_rate", "1e-3",
                                             "--data_path", "dataset/demo/dpo_poetry.jsonl", "--batch_size", bs,
                                             "--pack"),
                   nproc=nproc)
    one, two = (read_log(tmp_path / n / "rlhf_64_log.jsonl") for n in ("one", "two"))
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    np.testing.assert_allclose([r["rewards/accuracies"] for r in two], [r["rewards/accuracies"] for r in one])

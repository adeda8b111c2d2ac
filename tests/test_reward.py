"""The reward-model stage: the data formats, where the reward is read, and train_reward.py end to end."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from dataset.jsonl import DataError
from dataset.reward import RewardDataset, collate_reward_pairs
from model import ModelConfig
from model.heads import RewardModel, rewards_at
from model.tokenizer import EOS_ID, PAD_ID, Tokenizer
from tests.conftest import ROOT
from tests.helpers import read_log, run_script, write_jsonl
from trainer.checkpoint import load_reward_model
from trainer.losses import last_non_pad_index

IDENTITY = os.path.join(ROOT, "dataset", "demo", "dpo_identity.jsonl")


U = {"role": "user", "content": "Who are you?"}
A = {"role": "assistant", "content": "I am Deep TinyMind."}
B = {"role": "assistant", "content": "I am TinyMind."}
GOOD = {"question": "Who are you?", "response_chosen": "I am Deep TinyMind.", "response_rejected": "I am TinyMind."}


def test_formats_render_the_same_and_end_at_the_answers_eos(tmp_path):
    tok = Tokenizer()
    path = tmp_path / "rm.jsonl"
    write_jsonl(path, [
        {"chosen": [U, A], "rejected": [U, B]},                                            # MiniMind DPO
        {"prompt": "Who are you?", "chosen": "I am Deep TinyMind.", "rejected": "I am TinyMind."},  # TRL
        {**GOOD, "margin": 1.5},                                                           # classic RM
        {"system": "", "history": [["Hi", "Hello!"]], **GOOD},                            # with history
        {"chosen": [U, {"role": "assistant", "content": "I am Deep TinyMind." * 40}], "rejected": [U, B]},
    ])
    data = RewardDataset(str(path), tok, 64, None)
    assert [data[i]["chosen"] for i in range(3)] == [data[0]["chosen"]] * 3
    assert data[2]["margin"] == 1.5 and data[0]["margin"] == 0.0
    assert tok.decode(data[3]["chosen"]).endswith(
        "Hello!</s>\n<s>user\nWho are you?</s>\n<s>assistant\nI am Deep TinyMind.</s>")
    batch = collate_reward_pairs([data[i] for i in range(5)])
    assert batch["n_pairs"] == 4 and batch["n_dropped"] == 1          # the pair longer than max_seq_len
    ids, last = batch["input_ids"], batch["last_index"]
    assert (ids.gather(1, last.unsqueeze(1)) == EOS_ID).all()        # every row's reward token is its </s>
    assert torch.equal(last, last_non_pad_index(ids, PAD_ID))         # TRL's rule picks the same token


@pytest.mark.parametrize("row,error", [
    ({**GOOD, "question": ""}, "field 'question' must be a non-empty string"),
    ({"question": "Q?", "response_chosen": "a"}, "field 'response_rejected' must be a non-empty string"),
    ({**GOOD, "response_rejected": GOOD["response_chosen"]}, "are the same answer"),
    ({**GOOD, "history": [["only a question"]]}, "field 'history': turn 0 must be [question, answer]"),
    ({**GOOD, "history": "Hi"}, "field 'history' must be a list"),
    ({**GOOD, "system": 3}, "field 'system' must be a string"),
    ({**GOOD, "margin": "big"}, "field 'margin' must be a number"),
    ({"text": "hello"}, "not a preference pair"),
    ({"chosen": [U, A], "rejected": [U, A]}, "same answer"),
    ("{not json", "invalid JSON"),
])
def test_malformed_lines_give_file_line_errors(tmp_path, row, error):
    path = tmp_path / "rm.jsonl"
    write_jsonl(path, [GOOD, row])
    with pytest.raises(DataError) as e:
        RewardDataset(str(path), Tokenizer(), 64, None)
    assert str(e.value).startswith(f"{path}:2: ") and error in str(e.value), str(e.value)


def test_reward_is_read_at_the_last_token_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = RewardModel(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1)).eval()
    short, long = [1, 5, 6, EOS_ID], [1, 7, 8, 9, 10, EOS_ID]
    batch = collate_reward_pairs([{"chosen": short, "rejected": long, "margin": 0.0, "fits": True}])
    with torch.no_grad():
        rewards = rewards_at(model(batch["input_ids"]), batch["last_index"])
        alone = [model(torch.tensor([row]))[0, -1] for row in (short, long)]
    torch.testing.assert_close(rewards, torch.stack(alone), rtol=0, atol=1e-6)


def rm_args(out_dir, *extra):
    return ["--dim", "64", "--max_seq_len", "128", "--out_dir", out_dir, "--log_interval", "1", "--no_progress",
            "--device", "cpu", *extra]


def test_reward_model_learns_and_ranks_held_out_pairs(tmp_path, tiny_sft):
    """56 identity pairs to train on, 16 held out: the held-out accuracy starts near chance and ends well
    above it; the checkpoint scores chosen answers above rejected ones."""
    with open(IDENTITY, encoding="utf-8") as f:
        lines = f.read().splitlines()
    write_jsonl(tmp_path / "train.jsonl", lines[:56])
    write_jsonl(tmp_path / "held_out.jsonl", lines[56:])
    out = tmp_path / "out"
    shutil.copytree(tiny_sft, out)
    run_script("train_reward.py", *rm_args(str(out), "--data_path", tmp_path / "train.jsonl", "--eval_path",
                                           tmp_path / "held_out.jsonl", "--epochs", "3", "--learning_rate", "1e-3"))
    log = read_log(out / "reward_64_log.jsonl")
    steps = [r for r in log if "phase" not in r]
    before, after = [r for r in log if r.get("phase") == "before"][0], [r for r in log if r.get("phase") == "after"][0]
    assert abs(steps[0]["loss"] - math.log(2)) < 0.01            # a fresh head: every reward is ~0
    assert np.mean([r["loss"] for r in steps[-5:]]) < 0.4
    assert np.mean([r["accuracy"] for r in steps[-5:]]) > 0.8 and steps[-1]["margin"] > 0.5
    assert after["eval_loss"] < before["eval_loss"] - 0.3
    assert after["eval_accuracy"] >= 0.8 and after["eval_accuracy"] > before["eval_accuracy"]
    assert after["eval_margin"] > 0.5

    model, _, ckpt = load_reward_model(str(out / "reward_64.pth"))
    assert ckpt["stage"] == "reward" and "output.weight" not in ckpt["model"]
    data = RewardDataset(str(tmp_path / "held_out.jsonl"), Tokenizer(), 128, ckpt["reward"]["system_prompt"])
    batch = collate_reward_pairs([data[i] for i in range(len(data))])
    with torch.no_grad():
        chosen, rejected = rewards_at(model.eval()(batch["input_ids"]), batch["last_index"]).chunk(2)
    assert abs((chosen > rejected).float().mean().item() - after["eval_accuracy"]) < 1e-6

    # bench/score_reward.py scores conversations the same way: the chosen answers as conversations.
    write_jsonl(tmp_path / "answers.jsonl", [{"conversations": json.loads(line)["chosen"]} for line in lines[56:]])
    run_script("bench/score_reward.py", "--model", out / "reward_64.pth", "--data_path", tmp_path / "answers.jsonl",
               "--out", tmp_path / "scored.jsonl", "--device", "cpu", "--batch_size", "5")
    scored = read_log(tmp_path / "scored.jsonl")
    np.testing.assert_allclose([r["reward"] for r in scored], chosen.tolist(), rtol=0, atol=1e-5)
    write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [U, A]}, {"conversations": [U]}])
    proc = run_script("bench/score_reward.py", "--model", out / "reward_64.pth", "--data_path",
                      tmp_path / "bad.jsonl", check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:2: " in proc.stderr and "Traceback" not in proc.stderr


def test_two_processes_ddp_and_fsdp_match_one_process(tmp_path, tiny_sft):
    runs = (("one", 0, "8", []), ("two", 2, "4", []), ("fsdp", 2, "4", ["--fsdp"]))
    for name, nproc, bs, extra in runs:
        shutil.copytree(tiny_sft, tmp_path / name)
        run_script("train_reward.py", *rm_args(str(tmp_path / name), "--max_steps", "4", "--learning_rate", "1e-3",
                                               "--data_path", IDENTITY, "--eval_path", IDENTITY, "--batch_size", bs,
                                               "--center_rewards_coefficient", "0.01", *extra), nproc=nproc)
    one, two, fsdp = (read_log(tmp_path / name / "reward_64_log.jsonl") for name, *_ in runs)
    assert len(one) == len(two) == len(fsdp) == 6                 # before, 4 steps, after
    for key in ("loss", "accuracy", "margin", "mean_reward", "eval_loss", "eval_accuracy", "eval_margin"):
        ours = [r[key] for r in one if key in r]
        assert ours, key
        for other in (two, fsdp):
            # 1e-5: the log rounds to 6 decimals, and a mean reward near 0 can differ in its last digit
            np.testing.assert_allclose([r[key] for r in other if key in r], ours, rtol=1e-5, atol=1e-5, err_msg=key)
    # FSDP gathers the shards: the same checkpoint file as DDP writes.
    a, b = (torch.load(tmp_path / name / "reward_64.pth", weights_only=False)["model"] for name in ("two", "fsdp"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)


def test_bad_data_is_one_line_and_exit_2(tmp_path, tiny_sft):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [GOOD, {**GOOD, "question": 3}])
    shutil.copytree(tiny_sft, tmp_path / "out")
    proc = run_script("train_reward.py", *rm_args(str(tmp_path / "out"), "--data_path", path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"train_reward.py: error: {path}:2: field 'question' must be "
                                                    f"a non-empty string")
    assert "Traceback" not in proc.stderr

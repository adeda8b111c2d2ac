"""GRPO (train_grpo.py) and what it shares with PPO (trainer/rl.py, dataset/prompts.py, trainer/rewards.py):
prompt data, rollout tensors, the first on-policy update, frozen models, a short run that learns."""
import json
import os

import numpy as np
import pytest
import torch

import train_grpo
from dataset.jsonl import DataError
from dataset.prompts import PromptDataset
from model import ModelConfig, Transformer
from model.heads import RewardModel
from model.tokenizer import Tokenizer
from tests.conftest import ROOT
from tests.helpers import read_log, run_script
from trainer.checkpoint import load_model
from trainer.distributed import DistInfo
from trainer.precision import setup_precision
from trainer.rl import completion_logps, critic_values, frozen_copy, pack_rollout

DEMO_PROMPTS = os.path.join(ROOT, "dataset", "demo", "prompts_identity.jsonl")
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
FP32 = setup_precision("float32", torch.device("cpu"))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def tiny_policy(seed=0, vocab_size=6400):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab_size,
                                   max_seq_len=96))


U = {"role": "user", "content": "Who are you?"}


def test_prompt_formats_render_up_to_the_assistant_header(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "Who are you?"}, {"prompt": [U]}, {"conversations": [U]}, "",
                       {"conversations": [{"role": "system", "content": "Be brief."}, U,
                                          {"role": "assistant", "content": "Hi."}, U]}])
    tok = Tokenizer()
    data = PromptDataset(str(path), tok, 128, "SYS")
    assert len(data) == 4                       # the blank line is no record
    assert data[0] == data[1] == data[2]
    assert tok.decode(data[0]) == "<s>system\nSYS</s>\n<s>user\nWho are you?</s>\n<s>assistant\n"
    assert tok.decode(data[3]).startswith("<s>system\nBe brief.</s>")   # its own system prompt is kept
    assert len(PromptDataset(DEMO_PROMPTS, tok, 128, "SYS")) == 24       # the demo: DPO's identity questions


@pytest.mark.parametrize("row,error", [
    ({"prompt": ""}, "field 'prompt' is empty"),
    ({"prompt": 3}, "field 'prompt' must be a string or a list of messages"),
    ({"question": "Q?"}, "missing field 'prompt'"),
    ({"conversations": [U, {"role": "assistant", "content": "I am."}]}, "must end with a user message"),
    ({"conversations": [{"role": "assistant", "content": "I am."}]}, "expected role 'user'"),
    ({"prompt": "word " * 200}, "leaving no room for an answer"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "invalid JSON"),
])
def test_malformed_prompt_lines_give_file_line_errors(tmp_path, row, error):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"prompt": "Hi"}, row])
    with pytest.raises(DataError) as e:
        PromptDataset(str(path), Tokenizer(), 128, None)
    assert str(e.value).startswith(f"{path}:2: ") and error in str(e.value), str(e.value)
    skipped = PromptDataset(str(path), Tokenizer(), 128, None, skip_bad_lines=True)
    assert len(skipped) == 1 and skipped.bad_lines == 1


def test_rollout_tensors_give_each_row_what_it_gets_alone():
    """Batched and right-padded, each completion token's log-prob and value equal those of its row run
    alone, unpadded: the padding and the other rows change nothing, and column t is read where y_t is
    predicted."""
    policy = tiny_policy(vocab_size=100).eval()
    critic = RewardModel.from_language_model(policy).eval()
    prompts = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 8, 9]]
    completions = [[10, 11, 2], [12, 13, 14, 15, 16], [17]]
    batch = pack_rollout(prompts, completions, "cpu", width=7)
    assert batch["completion_mask"].sum(1).tolist() == [3, 5, 1]
    assert batch["truncated"].tolist() == [False, True, True]      # no </s>: cut by the length limit
    with torch.no_grad():
        logps, _ = completion_logps(policy, batch, 0.7, FP32.autocast)
        values = critic_values(critic, batch, FP32.autocast)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([p + c])
            alone = torch.log_softmax(policy(ids)[0, len(p) - 1:-1] / 0.7, -1).gather(1, ids[0, len(p):, None])[:, 0]
            torch.testing.assert_close(logps[i, :len(c)], alone, rtol=0, atol=1e-5)
            # values: one column more (the state after the last token: PPO's value mask)
            n = min(len(c) + 1, 7)
            torch.testing.assert_close(values[i, :n], critic(ids)[0, len(p) - 1:len(p) - 1 + n], rtol=0, atol=1e-5)
            assert batch["input_ids"][i, batch["last_index"][i]] == c[-1]


def grpo_setup(*flags, rule=lambda text, n: float(len(text) % 2)):
    args = train_grpo.make_parser().parse_args(["--num_generations", "4", "--max_completion_length", "8",
                                                "--max_seq_len", "96", "--seed", "3", *flags])
    policy = tiny_policy()
    reference = frozen_copy(policy) if args.beta else None
    reward_model = RewardModel(policy.cfg).eval().requires_grad_(False)
    make_experience, update_loss = train_grpo.make_grpo(policy, reference, reward_model, [("odd", rule)], Tokenizer(),
                                                        args, CPU, FP32)
    prompts = [[1, 5, 6, 7], [1, 9, 10]]
    return args, policy, reference, reward_model, make_experience, update_loss, prompts


def test_first_update_is_on_policy_ratio_one_and_the_loss_is_the_length_weighted_advantage():
    args, policy, reference, reward_model, make_experience, update_loss, prompts = grpo_setup("--beta", "0.04")
    batch, metrics = make_experience(prompts, 0)
    A, mask = batch["advantages"], batch["completion_mask"]
    assert torch.allclose(A.view(2, 4).sum(1), torch.zeros(2), atol=1e-5)       # group-centred
    # R = the sum of the reward functions (the reward model and the rule)
    assert metrics["reward"] == pytest.approx(metrics["rewards/reward_model/mean"] + metrics["rewards/odd/mean"])
    assert metrics["rewards/odd/std"] > 0                                       # the rule has spread
    loss, m = update_loss(batch, FP32.autocast)
    assert m["clip_ratio/region_mean"] == m["clip_ratio/low_mean"] == m["clip_ratio/high_mean"] == 0.0
    assert m["kl"] == 0.0                                                        # the reference is the start
    # dapo on-policy (ratio 1, KL 0): loss = -sum_i A_i |o_i| / sum_i |o_i|, an independent closed form
    lengths = mask.sum(1).float()
    assert loss.item() == pytest.approx(-(A * lengths).sum().item() / lengths.sum().item(), abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters())
    assert all(p.grad is None for p in list(reference.parameters()) + list(reward_model.parameters()))


def test_reused_rollout_starts_at_ratio_one_and_frozen_models_never_change():
    args, policy, reference, reward_model, make_experience, update_loss, prompts = grpo_setup(
        "--beta", "0.04", "--num_iterations", "2", "--learning_rate", "1e-2")
    frozen_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (reference, reward_model)]
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
    for iteration in range(2):
        batch, _ = make_experience(prompts, iteration)
        for update in range(args.num_iterations):
            loss, m = update_loss(batch, FP32.autocast)
            if update == 0:   # old log-probs from the rollout, same weights: ratio 1, nothing clipped
                assert m["clip_ratio/region_mean"] == 0.0
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for before, model in zip(frozen_before, (reference, reward_model)):
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # bit-identical
    assert not all(torch.equal(policy_before[k], v) for k, v in policy.state_dict().items())


def test_equal_rewards_give_zero_advantage_and_no_gradient():
    args, policy, *_ = grpo_setup()
    # A constant rule alone (no reward model): every group has std 0.
    make_experience, update_loss = train_grpo.make_grpo(policy, None, None, [("one", lambda text, n: 1.0)],
                                                        Tokenizer(), args, CPU, FP32)
    batch, metrics = make_experience([[1, 5, 6, 7], [1, 9, 10]], 0)
    assert torch.equal(batch["advantages"], torch.zeros(8))
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["reward_std"] == 0.0
    loss, _ = update_loss(batch, FP32.autocast)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in policy.parameters())


def test_short_run_raises_the_rule_reward_and_saves_a_chat_model(tmp_path, tiny_sft):
    out = tmp_path / "out"
    os.makedirs(out)
    os.link(tiny_sft / "full_sft_64.pth", out / "full_sft_64.pth")
    # ";" is in about half of the tiny model's answers: a reward with spread in every group.
    run_script("train_grpo.py", "--out_dir", out, "--reward_contains", ";", "--reward_model", "none",
               "--epochs", "2", "--batch_size", "4", "--num_generations", "8", "--max_completion_length", "24",
               "--max_seq_len", "128", "--learning_rate", "3e-3", "--no_progress", "--device", "cpu")
    log = read_log(out / "grpo_64_log.jsonl")
    assert [r["step"] for r in log] == list(range(12))
    for key in ("reward", "reward_std", "rewards/contains/mean", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "entropy", "clip_ratio/region_mean", "loss", "lr"):
        assert key in log[0], key
    first, last = np.mean([r["reward"] for r in log[:3]]), np.mean([r["reward"] for r in log[-3:]])
    assert last > first + 0.2, (first, last)
    model, cfg, ckpt = load_model(str(out / "grpo_64.pth"))     # what eval_model.py --checkpoint loads
    assert ckpt["stage"] == "grpo" and ckpt["grpo"]["rules"] == ["contains"] and cfg.dim == 64


def test_bad_prompt_file_and_missing_reward_are_one_line_exit_2(tmp_path, tiny_sft):
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"prompt": "Hi"}, {"prompt": "Hello"}, {"conversations": [U, {"role": "assistant",
                                                                                   "content": "x"}]}])
    common = ["--out_dir", tiny_sft, "--device", "cpu", "--max_seq_len", "128", "--save_name", "grpo_bad"]
    proc = run_script("train_grpo.py", *common, "--data_path", bad, "--reward_contains", "x",
                      "--reward_model", "none", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{bad}:3: field 'conversations': must end with a user message" in proc.stderr
    proc = run_script("train_grpo.py", *common, "--reward_model", "none", check=False)
    assert proc.returncode == 2 and "no reward: pass --reward_model PATH" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_two_processes_match_one_process(tmp_path, tiny_sft):
    """2 processes x 1 prompt == 1 process x 2 prompts: the same answers (seeds follow the global row), the
    same advantages (a prompt's G rows stay on one process) and the same update (dapo's global token count)."""
    runs = {}
    for name, nproc, batch in (("one", 0, "2"), ("two", 2, "1")):
        out = tmp_path / name
        os.makedirs(out)
        os.link(tiny_sft / "full_sft_64.pth", out / "full_sft_64.pth")
        run_script("train_grpo.py", "--out_dir", out, "--reward_contains", ";", "--reward_model", "none",
                   "--max_steps", "3", "--batch_size", batch, "--num_generations", "4", "--max_completion_length",
                   "16", "--max_seq_len", "128", "--learning_rate", "3e-3", "--no_progress", "--device", "cpu",
                   nproc=nproc)
        runs[name] = read_log(out / "grpo_64_log.jsonl"), load_model(str(out / "grpo_64.pth"))[0]
    (log1, model1), (log2, model2) = runs["one"], runs["two"]
    for key in ("loss", "reward", "completions/mean_length"):
        np.testing.assert_allclose([r[key] for r in log2], [r[key] for r in log1], rtol=1e-4, atol=1e-6)
    for (k, a), b in zip(model1.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=k)


def test_rule_rewards_are_switched_on_by_their_flags():
    from trainer.rewards import active_rules
    args = train_grpo.make_parser().parse_args(["--reward_contains", "Deep TinyMind", "--reward_length", "10"])
    rules = dict(active_rules(args))
    assert rules["contains"]("I am Deep TinyMind.", 7) == 1.0 and rules["contains"]("I am TinyMind.", 6) == 0.0
    assert rules["length"]("", 10) == 0.0 and rules["length"]("", 15) == -0.5 and rules["length"]("", 0) == -1.0
    assert active_rules(train_grpo.make_parser().parse_args([])) == []

"""PPO (train_ppo.py): the four models, the first on-policy update, what is frozen and what is trained, the
missing-EOS penalty, a run end to end and its resume after an interrupt."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_ppo
from model.heads import RewardModel
from model.tokenizer import Tokenizer
from tests.conftest import ROOT
from tests.helpers import read_log, run_script
from tests.test_grpo import CPU, FP32, tiny_policy
from trainer.checkpoint import load_model, load_reward_model
from trainer.losses import masked_mean
from trainer.rl import frozen_copy

PROMPTS = [[1, 5, 6, 7], [1, 9, 10], [1, 3, 4, 5, 6, 8, 9], [1, 20]]


def ppo_setup(*flags):
    args = train_ppo.make_parser().parse_args(["--response_length", "8", "--max_seq_len", "96", "--seed", "5",
                                               *flags])
    actor = tiny_policy(seed=0)
    torch.manual_seed(1)
    reward_model = RewardModel(actor.cfg).eval().requires_grad_(False)
    critic = RewardModel.from_language_model(actor)
    critic.score.weight.data.copy_(reward_model.score.weight)      # a head that is not the RM's body
    reference = frozen_copy(actor)
    make_experience, update_loss = train_ppo.make_ppo(actor, critic, reference, reward_model, [], Tokenizer(),
                                                      args, CPU, FP32)
    return args, actor, critic, reference, reward_model, make_experience, update_loss


def test_first_update_is_on_policy_and_gradients_reach_only_actor_and_critic():
    args, actor, critic, reference, reward_model, make_experience, update_loss = ppo_setup()
    batch, metrics = make_experience(PROMPTS, 0)
    # The scores are the frozen reward model's, read at each answer's last token, each row run alone.
    with torch.no_grad():
        alone = [reward_model(batch["input_ids"][i:i + 1, :batch["last_index"][i] + 1])[0, -1]
                 for i in range(len(PROMPTS))]
    assert metrics["objective/scores"] == pytest.approx(torch.stack(alone).mean().item(), abs=1e-6)
    assert metrics["objective/kl"] == 0.0             # the actor is the reference: k1 = 0 on every token
    loss, m = update_loss(batch, FP32.autocast)
    assert m["policy/clipfrac_avg"] == 0.0 and m["val/clipfrac_avg"] == 0.0
    assert m["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-12)
    assert m["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    # ratio 1: the policy loss is -mean(A) over the response tokens, 0 for whitened advantages; the value
    # loss is the unclipped 1/2 mean (V - R)^2 over the value mask (V_new = V_old).
    assert m["loss/policy_avg"] == pytest.approx(0.0, abs=1e-6)
    vf = 0.5 * masked_mean((batch["old_values"] - batch["returns"]) ** 2, batch["value_mask"])
    assert m["loss/value_avg"] == pytest.approx(vf.item(), rel=1e-5)
    assert loss.item() == pytest.approx(m["loss/policy_avg"] + args.vf_coef * m["loss/value_avg"], rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in list(actor.parameters()) + list(critic.parameters()))
    assert critic.score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in list(reference.parameters()) + list(reward_model.parameters()))


def test_updates_train_actor_and_critic_and_leave_the_frozen_models_bit_identical():
    args, actor, critic, reference, reward_model, make_experience, update_loss = ppo_setup("--learning_rate", "1e-2")
    frozen = [{k: v.clone() for k, v in m.state_dict().items()} for m in (reference, reward_model)]
    trained = [{k: v.clone() for k, v in m.state_dict().items()} for m in (actor, critic)]
    optimizer = torch.optim.AdamW(torch.nn.ModuleDict({"actor": actor, "critic": critic}).parameters(), lr=1e-2)
    for iteration in range(2):
        batch, _ = make_experience(PROMPTS, iteration)
        for _ in range(args.num_ppo_epochs):
            loss, _ = update_loss(batch, FP32.autocast)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for before, model in zip(frozen, (reference, reward_model)):
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for before, model in zip(trained, (actor, critic)):
        assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_eos_penalty_lowers_exactly_the_truncated_answers():
    *_, plain, _ = ppo_setup("--response_length", "3")
    *_, penalised, _ = ppo_setup("--response_length", "3", "--missing_eos_penalty", "1.5")
    batch, m0 = plain(PROMPTS, 0)
    _, m1 = penalised(PROMPTS, 0)                          # same seeds: the same answers
    truncated = batch["truncated"].float().mean().item()
    assert truncated > 0
    assert m1["objective/scores"] == pytest.approx(m0["objective/scores"] - 1.5 * truncated, abs=1e-6)


def ppo_args(out, *extra):
    return ["--out_dir", out, "--batch_size", "2", "--response_length", "16", "--max_seq_len", "128",
            "--learning_rate", "1e-3", "--no_progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def with_reward_model(tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    os.link(tiny_sft / "full_sft_64.pth", out / "full_sft_64.pth")
    run_script("train_reward.py", "--out_dir", out, "--data_path", os.path.join(ROOT, "dataset/demo/dpo_identity.jsonl"),
               "--max_steps", "5", "--batch_size", "8", "--max_seq_len", "128", "--learning_rate", "1e-3",
               "--no_progress", "--device", "cpu")
    return out


def test_ppo_run_logs_trl_names_and_writes_actor_and_critic(with_reward_model):
    out = with_reward_model
    run_script("train_ppo.py", *ppo_args(out, "--max_steps", "3"))
    log = read_log(out / "ppo_64_log.jsonl")
    assert [r["step"] for r in log] == [0, 1, 2]
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg", "val/ratio", "policy/entropy_avg", "val/num_eos_tokens",
                "completions/mean_length", "episode"):
        assert key in log[0], key
    r = log[0]
    assert r["objective/rlhf_reward"] == pytest.approx(r["objective/non_score_reward"] + r["objective/scores"],
                                                       abs=2e-6)
    actor, _, ckpt = load_model(str(out / "ppo_actor_64.pth"))          # eval_model.py --checkpoint's loader
    assert ckpt["stage"] == "ppo_actor" and ckpt["ppo"]["reward_model"].endswith("reward_64.pth")
    critic = load_reward_model(str(out / "ppo_critic_64.pth"))[0]
    reward_model = load_reward_model(str(out / "reward_64.pth"))[0]
    start = load_model(str(out / "full_sft_64.pth"))[0]
    # trained: the actor moved away from SFT, the critic away from the reward model it started as
    assert not torch.equal(actor.output.weight, start.output.weight)
    assert not torch.equal(critic.score.weight, reward_model.score.weight)


def test_resume_after_interrupt_equals_uninterrupted_run(with_reward_model, tmp_path):
    args = ["--epochs", "1"]                                 # 24 prompts / 2 = 12 iterations
    full, cut = tmp_path / "full", tmp_path / "cut"
    for d in (full, cut):
        os.makedirs(d)
        for name in ("full_sft_64.pth", "reward_64.pth"):
            os.link(with_reward_model / name, d / name)
    run_script("train_ppo.py", *ppo_args(full, *args))
    proc = subprocess.Popen([sys.executable, "train_ppo.py", *map(str, ppo_args(cut, *args))], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log_path = cut / "ppo_64_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log_path.exists() and len(log_path.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    stopped_at = torch.load(cut / "ppo_64_resume.pth", weights_only=False)["step"]
    assert 2 <= stopped_at < 12
    run_script("train_ppo.py", *ppo_args(cut, *args, "--resume"))
    drop = ("rollout_time", "step_time", "tokens_per_s")
    same = lambda log: [{k: v for k, v in r.items() if k not in drop} for r in log]   # noqa: E731
    assert same(read_log(log_path)) == same(read_log(full / "ppo_64_log.jsonl"))     # bit-exact on CPU
    for name in ("ppo_actor_64.pth", "ppo_critic_64.pth"):
        a, b = (torch.load(d / name, weights_only=False)["model"] for d in (full, cut))
        assert all(torch.equal(a[k], b[k]) for k in a)

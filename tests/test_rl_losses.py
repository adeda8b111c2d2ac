"""Reward-model, PPO and GRPO losses (trainer/losses.py) against the numbers TRL's own code computes.

The fixtures (tests/data/{reward,ppo,grpo}_trl.json, copies of ../shared/fixtures/) hold fixed inputs and
TRL's outputs; each file's `description` defines every key. Every case and config is checked here: values,
gradients and logged metrics. `python tests/test_rl_losses.py` prints the largest difference per function.
"""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.losses import (completion_length_metrics, grpo_aggregate, grpo_clip_metrics,  # noqa: E402
                            grpo_reward_metrics, grpo_token_losses, group_advantages, kl_estimate,
                            last_non_pad_index, masked_mean, ppo_advantages, ppo_policy_loss, ppo_rollout_metrics,
                            ppo_value_loss, process_responses, reward_metrics, reward_pair_loss, sequence_logps,
                            token_logps_and_entropy)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
RTOL, ATOL = 1e-5, 1e-5   # the fixtures were computed in float32; 1e-5 is the brief's tolerance
# GRPO loss types of TRL that trainer/losses.py does not implement (their configs are skipped, by name).
GRPO_NOT_IMPLEMENTED = ()


def load(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return json.load(f)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def padded(rows, pad):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


# ---------------------------------------------------------------------------------------------------------
# Each *_outputs function computes what one fixture config expects, with our functions, and returns
# {fixture key: (ours, TRL's)}: the tests compare them, __main__ prints the differences.
# ---------------------------------------------------------------------------------------------------------

def reward_outputs(case, config_name):
    x, options = case["inputs"], case["configs"][config_name]
    want = case["expected"][config_name]
    chosen = t(x["rewards_chosen"]).requires_grad_()
    rejected = t(x["rewards_rejected"]).requires_grad_()
    margin = t(x["margin"]) if options.get("use_margin") else None
    losses, center = reward_pair_loss(chosen, rejected, margin, options.get("center_rewards_coefficient"))
    loss = (losses + center).mean()
    loss.backward()
    rows = padded(x["chosen_input_ids"] + x["rejected_input_ids"], x["pad_token_id"])
    metrics = reward_metrics(chosen, rejected)
    metrics["num_tokens"] = float((rows != x["pad_token_id"]).sum())   # the attention mask of the batch
    return {"per_pair_loss": (losses, want["per_pair_loss"]), "center_term": (center.mean(), want["center_term"]),
            "loss": (loss, want["loss"]), "grad_rewards_chosen": (chosen.grad, want["grad_rewards_chosen"]),
            "grad_rewards_rejected": (rejected.grad, want["grad_rewards_rejected"]),
            "reward_token_index": (last_non_pad_index(rows, x["pad_token_id"]), want["reward_token_index"]),
            **{f"metrics/{k}": (metrics[k], v) for k, v in want["metrics"].items()}}


def ppo_outputs(case, config_name):
    x, cfg = case["inputs"], case["expected"][config_name]["effective_config"]
    want = case["expected"][config_name]
    responses = t(x["responses"], torch.long)
    processed, seq_lens, contain_eos = process_responses(responses, x["eos_token_id"], x["pad_token_id"],
                                                         cfg["stop_token_id_used"])
    scores = t(x["scores"])
    if cfg["missing_eos_penalty"] is not None:
        scores = scores - cfg["missing_eos_penalty"] * (~contain_eos).float()
    logps = t(x["logprobs"])
    r = ppo_advantages(logps, t(x["ref_logprobs"]), t(x["values"]), scores, seq_lens, cfg["kl_coef"],
                       cfg["kl_estimator"], cfg["gamma"], cfg["lam"], cfg["whiten_rewards"])
    out = {"postprocessed_responses": (processed, want["postprocessed_responses"]),
           "sequence_lengths": (seq_lens, want["sequence_lengths"]), "contain_eos": (contain_eos, want["contain_eos"]),
           "scores": (scores, want["scores"]), "response_mask": (r["response_mask"].long(), want["response_mask"]),
           "value_mask": (r["value_mask"].long(), want["value_mask"]),
           "score_position": (r["score_position"], want["score_position"])}
    for key in ("kl", "non_score_reward", "rewards", "gae_advantages", "returns", "advantages"):
        # Expected per-token arrays are 0 outside the relevant mask (TRL leaves arbitrary values there).
        mask = r["response_mask"] if key in ("kl", "non_score_reward", "advantages") else r["value_mask"]
        out[key] = (torch.where(mask, r[key], torch.zeros_like(r[key])), want[key])

    per_update = []
    for k, (upd, w) in enumerate(zip(x["updates"], want["updates"])):
        rows = torch.tensor(upd["rows"])
        new_logps = t(upd["new_logprobs"]).requires_grad_()
        new_values = t(upd["new_values"]).requires_grad_()
        old_logps = torch.where(r["response_mask"], logps, torch.ones_like(logps))[rows]   # INVALID_LOGPROB
        pg_loss, pg = ppo_policy_loss(new_logps, old_logps, r["advantages"][rows], r["response_mask"][rows],
                                      cfg["cliprange"])
        vf_loss, vf = ppo_value_loss(new_values, r["values"][rows], r["returns"][rows], r["value_mask"][rows],
                                     cfg["cliprange_value"])
        loss = pg_loss + cfg["vf_coef"] * vf_loss
        loss.backward()
        entropy_mean = t(upd["new_entropy"]).mean()
        m, vm = r["response_mask"][rows], r["value_mask"][rows]
        zero_out = lambda v, mask: torch.where(mask, v, torch.zeros_like(v))
        out.update({f"updates[{k}]/ratio": (zero_out(pg["ratio"], m), w["ratio"]),
                    f"updates[{k}]/per_token_pg_loss": (zero_out(pg["per_token_loss"], m), w["per_token_pg_loss"]),
                    f"updates[{k}]/per_token_vf_loss": (zero_out(vf["per_token_loss"], vm), w["per_token_vf_loss"]),
                    f"updates[{k}]/pg_loss": (pg_loss, w["pg_loss"]), f"updates[{k}]/vf_loss": (vf_loss, w["vf_loss"]),
                    f"updates[{k}]/loss": (loss, w["loss"]),
                    f"updates[{k}]/pg_clipfrac": (pg["clipfrac"], w["pg_clipfrac"]),
                    f"updates[{k}]/vf_clipfrac": (vf["clipfrac"], w["vf_clipfrac"]),
                    f"updates[{k}]/approxkl": (pg["approxkl"], w["approxkl"]),
                    f"updates[{k}]/ratio_mean": (pg["ratio_mean"], w["ratio_mean"]),
                    f"updates[{k}]/entropy_mean": (entropy_mean, w["entropy_mean"]),
                    f"updates[{k}]/grad_new_logprobs": (new_logps.grad, w["grad_new_logprobs"]),
                    f"updates[{k}]/grad_new_values": (new_values.grad, w["grad_new_values"])})
        per_update.append({"approxkl": pg["approxkl"], "clipfrac": pg["clipfrac"], "pg": pg_loss.detach(),
                           "vf": vf_loss.detach(), "vf_clipfrac": vf["clipfrac"], "entropy": entropy_mean,
                           "ratio": pg["ratio_mean"]})

    metrics = ppo_rollout_metrics(r["kl"], logps, r["non_score_reward"], r["response_mask"], scores)
    mean_of = lambda key: torch.stack([u[key] for u in per_update]).mean().item()
    metrics.update({"policy/approxkl_avg": mean_of("approxkl"), "policy/clipfrac_avg": mean_of("clipfrac"),
                    "loss/policy_avg": mean_of("pg"), "loss/value_avg": mean_of("vf"),
                    "val/clipfrac_avg": mean_of("vf_clipfrac"), "policy/entropy_avg": mean_of("entropy"),
                    "val/ratio": mean_of("ratio"),
                    "val/ratio_var": torch.stack([u["ratio"] for u in per_update]).var().item(),
                    "val/num_eos_tokens": float((responses == x["eos_token_id"]).sum())})
    out.update({f"metrics/{k}": (metrics[k], v) for k, v in want["metrics"].items()})
    return out


def grpo_outputs(case, config_name):
    x = case["inputs"]
    want = case["expected"][config_name]
    cfg = want["effective_config"]
    mask = t(x["completion_mask"], torch.long)
    truncated = torch.tensor([ids[-1] not in (x["eos_token_id"], x["pad_token_id"]) for ids in x["completion_ids"]])
    if cfg["mask_truncated_completions"]:   # a completion cut off by the length limit is left out of the loss
        mask = mask * (~truncated).long().unsqueeze(1)
    rewards_per_func = t(x["rewards_per_func"])
    rewards = (rewards_per_func * t(cfg["reward_weights"])).sum(1)
    advantages, group_mean, group_std, is_std_zero = group_advantages(rewards, x["num_generations"],
                                                                      cfg["scale_rewards"])
    logps = t(x["per_token_logps"]).requires_grad_()
    old = logps.detach() if cfg["num_iterations"] == 1 else t(x["old_per_token_logps"])
    ref, entropies = t(x["ref_per_token_logps"]), t(x["entropies"])
    k = cfg["num_micro_batches"]
    n_rows = len(rewards) // k
    num_items = mask.sum()   # dapo/cispo: completion tokens of the whole generation batch
    parts, micro_losses, micro_metrics = [], [], []
    for i in range(k):
        rows = slice(i * n_rows, (i + 1) * n_rows)
        m = mask[rows]
        r = grpo_token_losses(logps[rows], old[rows], advantages[rows], m, cfg["loss_type"], cfg["epsilon_low"],
                              cfg["epsilon_high"], cfg["delta"], cfg["importance_sampling_level"], cfg["beta"],
                              ref[rows], cfg["use_bias_correction_kl"])
        per_token_loss = r["per_token_loss"]
        if cfg["top_entropy_quantile"] < 1.0:   # train only on the highest-entropy tokens ("forking tokens")
            per_token_loss = per_token_loss * high_entropy_mask(entropies[rows], m, cfg["top_entropy_quantile"])
        loss = grpo_aggregate(per_token_loss, m, cfg["loss_type"], cfg["max_completion_length"], num_items, k)
        metrics = {}
        if cfg["entropy_coef"]:
            metrics.update({"policy_loss": loss.item(), "entropy_coef": cfg["entropy_coef"]})
            loss = loss - cfg["entropy_coef"] * masked_mean(entropies[rows], m) / k
        if cfg["beta"] != 0.0:
            metrics["kl"] = masked_mean(r["per_token_kl"].detach(), m).item()
        metrics["entropy"] = masked_mean(entropies[rows], m).item()
        metrics.update(grpo_clip_metrics(r["ratio"].detach(), advantages[rows], m, cfg["epsilon_low"],
                                         cfg["epsilon_high"], cfg["loss_type"]))
        if cfg["loss_type"] == "vespo":
            metrics["vespo/phi_seq_mean"] = r["phi"].mean().item()
        parts.append({**r, "per_token_loss": per_token_loss})
        micro_losses.append(loss)
        micro_metrics.append(metrics)
    total = torch.stack(micro_losses).sum()
    total.backward()

    lengths = t([len(ids) for ids in x["completion_ids"]])
    metrics = {"num_tokens": float(sum(x["prompt_lengths"]) * x["num_generations"] + lengths.sum()),
               **completion_length_metrics(lengths, truncated),
               **grpo_reward_metrics(rewards, is_std_zero, rewards_per_func, x["reward_func_names"])}
    for key in micro_metrics[0]:
        values = [mm[key] for mm in micro_metrics if not math.isnan(mm[key])]
        metrics[key] = sum(values) / len(values)
    cat = lambda key: torch.cat([p[key] for p in parts]).detach()
    # Expected per-token arrays are 0 outside the (effective) completion mask.
    full_mask = mask.bool()
    masked = lambda v: torch.where(full_mask, v, torch.zeros_like(v))
    out = {"rewards": (rewards, want["rewards"]), "group_mean": (group_mean, want["group_mean"]),
           "group_std": (group_std, want["group_std"]), "advantages": (advantages, want["advantages"]),
           "is_std_zero": (is_std_zero, want["is_std_zero"]), "completion_mask": (mask, want["completion_mask"]),
           "micro_batch_losses": (torch.stack(micro_losses), want["micro_batch_losses"]),
           "loss": (total, want["loss"]), "grad_per_token_logps": (logps.grad, want["grad_per_token_logps"])}
    for key in ("log_ratio", "ratio", "per_token_kl", "per_token_loss"):
        if key in want:
            out[key] = (masked(cat(key)), want[key])
    out.update({f"metrics/{key}": (metrics[key], v) for key, v in want["metrics"].items()})
    return out


def high_entropy_mask(entropies, mask, top_quantile):
    """Tokens whose entropy is at least the (1 - top_quantile) quantile of this micro-batch's masked
    entropies (TRL's top_entropy_quantile, https://arxiv.org/abs/2506.01939)."""
    threshold = torch.quantile(entropies[mask.bool()].float(), 1 - top_quantile)
    return ((entropies >= threshold) & mask.bool()).float()


def max_difference(ours, theirs):
    """The largest |ours - theirs| (None in the fixture means TRL got NaN/inf: we must too)."""
    ours = torch.as_tensor(ours).detach().double()
    theirs = torch.tensor(theirs, dtype=torch.float64) if theirs is not None else torch.tensor(float("nan"))
    if not torch.isfinite(theirs).all() or not torch.isfinite(ours).all():
        same = torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
        return 0.0 if same else float("inf")
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return (ours - theirs).abs().max().item() if ours.numel() else 0.0


def assert_matches(outputs):
    for key, (ours, theirs) in outputs.items():
        ours_t = torch.as_tensor(ours).detach().double()
        theirs_t = torch.tensor(theirs, dtype=torch.float64)
        torch.testing.assert_close(ours_t, theirs_t, rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")


def configs(fixture):
    return [(i, name) for i, c in enumerate(load(fixture)["cases"]) for name in c["configs"]]


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,config", configs("reward_trl.json"))
def test_reward_loss_matches_trl(case, config):
    assert_matches(reward_outputs(load("reward_trl.json")["cases"][case], config))


def test_reward_tie_is_ln2_and_not_accurate():
    losses, _ = reward_pair_loss(t([0.3]), t([0.3]))
    assert abs(losses.item() - math.log(2)) < 1e-7
    assert reward_metrics(t([0.3]), t([0.3]))["accuracy"] == 0.0


@pytest.mark.parametrize("case,config", configs("ppo_trl.json"))
def test_ppo_matches_trl(case, config):
    assert_matches(ppo_outputs(load("ppo_trl.json")["cases"][case], config))


@pytest.mark.parametrize("case,config", [(i, n) for i, n in configs("grpo_trl.json")
                                         if not n.startswith(GRPO_NOT_IMPLEMENTED)])
def test_grpo_matches_trl(case, config):
    assert_matches(grpo_outputs(load("grpo_trl.json")["cases"][case], config))


def test_token_logps_and_entropy():
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    logps, entropy = token_logps_and_entropy(logits, tokens)
    torch.testing.assert_close((logps * mask).sum(-1), sequence_logps(logits, tokens, mask))
    torch.testing.assert_close(entropy, torch.distributions.Categorical(logits=logits).entropy())
    hot, _ = token_logps_and_entropy(logits, tokens, temperature=0.7)
    torch.testing.assert_close(hot, torch.distributions.Categorical(logits=logits / 0.7).log_prob(tokens))


def test_kl_estimators():
    """k1 and k3 are unbiased estimates of KL(p || q) from samples of p; k3 and k2 are never negative."""
    torch.manual_seed(0)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    for name in ("k1", "k3"):
        assert abs(kl_estimate(logp, logq, name).mean() - exact) < 5e-3, name
    for name in ("k2", "k3"):
        assert (kl_estimate(logp, logq, name) >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(logp, logq, "k4")


def test_ppo_first_update_on_policy_has_ratio_one_and_no_clipping():
    torch.manual_seed(0)
    logps, values = -torch.rand(4, 6) * 3, torch.randn(4, 6)
    seq_lens = torch.tensor([5, 2, 3, 5])
    r = ppo_advantages(logps, logps - 0.1, values, torch.randn(4), seq_lens)
    new = logps.clone().requires_grad_()
    loss, pg = ppo_policy_loss(new, torch.where(r["response_mask"], logps, torch.ones_like(logps)),
                               r["advantages"], r["response_mask"])
    _, vf = ppo_value_loss(r["values"].clone(), r["values"], r["returns"], r["value_mask"])
    assert torch.equal(pg["ratio"], torch.ones_like(pg["ratio"]))
    assert pg["clipfrac"] == 0 and vf["clipfrac"] == 0 and pg["approxkl"] == 0
    # On-policy the loss is -mean(A) = 0 (whitened advantages), but the gradient is -A / n_tokens.
    assert abs(loss.item()) < 1e-6
    loss.backward()
    n = r["response_mask"].sum()
    torch.testing.assert_close(new.grad, -r["advantages"] / n)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_on_policy_ratio_is_one_and_nothing_clipped(loss_type):
    torch.manual_seed(0)
    logps = (-torch.rand(4, 5) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    advantages, *_ = group_advantages(torch.tensor([1.0, 0.0, 2.0, 0.5]), 2)
    r = grpo_token_losses(logps, logps.detach(), advantages, mask, loss_type, epsilon_high=0.28)
    assert torch.equal(r["ratio"], torch.ones_like(r["ratio"]))
    clip = grpo_clip_metrics(r["ratio"], advantages, mask, 0.2, 0.28)
    assert all(v == 0 for v in clip.values())
    loss = grpo_aggregate(r["per_token_loss"], mask, loss_type, 5, mask.sum())
    loss.backward()
    assert logps.grad.abs().sum() > 0            # rho = 1, yet the policy gradient is not zero


def test_grpo_equal_rewards_give_zero_advantage_and_no_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 1.0, 1.0])
    for scale in ("group", "batch", "none"):
        advantages, _, std, is_zero = group_advantages(rewards, 4, scale)
        assert torch.isfinite(advantages).all()
        assert torch.equal(advantages[:4], torch.zeros(4)), scale      # exactly 0, not 0/0
        assert advantages[4:].abs().sum() > 0
    _, _, _, is_zero = group_advantages(rewards, 4, "group")
    assert is_zero.tolist() == [True] * 4 + [False] * 4
    assert grpo_reward_metrics(rewards, is_zero)["frac_reward_zero_std"] == 0.5
    logps = (-torch.rand(8, 3)).requires_grad_()
    advantages, *_ = group_advantages(rewards, 4)
    r = grpo_token_losses(logps, logps.detach(), advantages, torch.ones(8, 3), "dapo")
    loss = grpo_aggregate(r["per_token_loss"], torch.ones(8, 3), "dapo", num_items_in_batch=24)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(logps.grad[:4], torch.zeros(4, 3))


def test_unknown_options_are_refused():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 2, "sometimes")
    with pytest.raises(ValueError):
        grpo_token_losses(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), "gspo")


def fixture_report():
    """{function: (largest difference over every case/config of the fixtures, number of values compared)}."""
    groups = {"reward_pair_loss": ("per_pair_loss", "center_term", "loss", "grad_"),
              "last_non_pad_index": ("reward_token_index",), "reward_metrics": ("metrics/",),
              "process_responses": ("postprocessed_responses", "sequence_lengths", "contain_eos", "scores"),
              "response_masks": ("response_mask", "value_mask"),
              "ppo_rewards / kl_estimate": ("kl", "non_score_reward", "rewards", "score_position"),
              "gae": ("gae_advantages", "returns"), "masked_whiten (advantages)": ("advantages",),
              "ppo_policy_loss": ("ratio", "per_token_pg_loss", "pg_loss", "pg_clipfrac", "approxkl", "ratio_mean",
                                  "grad_new_logprobs"),
              "ppo_value_loss": ("per_token_vf_loss", "vf_loss", "vf_clipfrac", "grad_new_values"),
              "ppo total loss": ("loss",), "ppo metrics": ("metrics/", "entropy_mean"),
              "group_advantages": ("rewards", "group_mean", "group_std", "advantages", "is_std_zero"),
              "grpo_token_losses": ("completion_mask", "log_ratio", "ratio", "per_token_kl", "per_token_loss"),
              "grpo_aggregate (+ gradients)": ("micro_batch_losses", "loss", "grad_per_token_logps"),
              "grpo metrics": ("metrics/",)}
    report = {}
    sources = (("reward", "reward_trl.json", reward_outputs), ("ppo", "ppo_trl.json", ppo_outputs),
               ("grpo", "grpo_trl.json", grpo_outputs))
    for label, fixture, fn in sources:
        names = {"reward": ["reward_pair_loss", "last_non_pad_index", "reward_metrics"],
                 "ppo": [n for n in groups if n.startswith(("process", "response", "ppo", "gae", "masked"))],
                 "grpo": [n for n in groups if n.startswith(("group", "grpo"))]}[label]
        for case, config in configs(fixture):
            if config.startswith(GRPO_NOT_IMPLEMENTED):
                continue
            for key, (ours, theirs) in fn(load(fixture)["cases"][case], config).items():
                leaf = key.split("/", 1)[1] if key.startswith("updates[") else key
                for name in names:
                    if any(leaf == p or (p.endswith(("/", "_")) and leaf.startswith(p)) for p in groups[name]):
                        worst, count = report.get(name, (0.0, 0))
                        report[name] = (max(worst, max_difference(ours, theirs)), count + torch.as_tensor(ours).numel())
                        break
                else:
                    raise KeyError(f"{fixture} {config}: {key} belongs to no function of the report")
    return report


if __name__ == "__main__":
    for name, (diff, count) in fixture_report().items():
        print(f"{name:30s} max |ours - TRL| = {diff:.3g} over {count} values")
    if GRPO_NOT_IMPLEMENTED:
        print(f"(not implemented, skipped: GRPO loss types {', '.join(GRPO_NOT_IMPLEMENTED)})")

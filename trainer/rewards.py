"""Rule rewards: a number for each answer computed by a rule instead of (or next to) a reward model.

Each rule has a flag; giving the flag switches the rule on, and its value parameterises it:

    --reward_contains "Deep TinyMind"   1 if the answer's text contains the string, else 0
    --reward_length 40                  -|n - 40| / 40 for an answer of n tokens (0 at exactly 40 tokens)

To add one: write `def my_rule(value, text, n_tokens) -> float` and add a RuleReward line to RULE_REWARDS.
MiniMind's GRPO/PPO use rules like these (answer length, <think> format, a repetition penalty) on top of an
external reward model; TRL calls them reward functions and logs each one as rewards/<name>/mean and /std.
"""
import os
from dataclasses import dataclass

import torch

from dataset.chat import DEFAULT_SYSTEM_PROMPT
from model.tokenizer import EOS_ID
from trainer.checkpoint import checkpoint_tokenizer, load_reward_model, stage_path
from trainer.cli import UserError, positive_int


def contains(value, text, n_tokens):
    return float(value in text)


def length(value, text, n_tokens):
    return -abs(n_tokens - value) / value


@dataclass
class RuleReward:
    flag: str         # the command-line flag that switches the rule on and gives its value
    type: object      # argparse type of the value
    help: str
    function: object  # (value, answer text, answer length in tokens incl. </s>) -> float


RULE_REWARDS = {
    "contains": RuleReward("--reward_contains", str, "reward 1 when the answer contains this text, else 0", contains),
    "length": RuleReward("--reward_length", positive_int, "reward -|n - N| / N for an answer of n tokens", length),
}


def add_reward_flags(parser):
    """--reward_model and the rule flags: the rewards of train_ppo.py and train_grpo.py."""
    g = parser.add_argument_group("rewards: a reward model and/or rules (trainer/rewards.py), summed")
    g.add_argument("--reward_model", default=None,
                   help="reward model checkpoint (train_reward.py); default: {out_dir}/reward_{dim}.pth if it "
                        "exists; 'none': rule rewards only")
    for rule in RULE_REWARDS.values():
        g.add_argument(rule.flag, type=rule.type, default=None, help=rule.help)


def add_prompt_flags(parser):
    """The prompt-side flags of train_ppo.py and train_grpo.py: the system prompt and the held-out answer length."""
    parser.add_argument("--eval_max_new_tokens", type=positive_int, default=64,
                        help="answer length for the --eval_path prompts (held-out reward before and after)")
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="system prompt for prompts that have none ('' for none)")


def active_rules(args):
    """[(name, function(text, n_tokens) -> float)] of the rules whose flag was given."""
    out = []
    for name, rule in RULE_REWARDS.items():
        value = getattr(args, rule.flag.lstrip("-"))
        if value is not None:
            out.append((name, lambda text, n, f=rule.function, v=value: f(v, text, n)))
    return out


def setup_rewards(args, dim, dist, tokenizer):
    """(reward model or None, its path, active rules) from the flags; at least one reward must be on. The
    reward model may have another size than the policy; it only has to read prompt + answer (--max_seq_len),
    with the policy's `tokenizer` (it scores the policy's token ids)."""
    path = args.reward_model
    if path is None and os.path.isfile(stage_path(args.out_dir, "reward", dim)):
        path = stage_path(args.out_dir, "reward", dim)
    reward_model = None
    if path and path != "none":
        reward_model, _, ckpt = load_reward_model(path, {"max_seq_len": args.max_seq_len, "dropout": 0.0})
        if not checkpoint_tokenizer(ckpt, path).same_as(tokenizer):
            raise UserError(f"the reward model {path} was trained with another tokenizer than the policy "
                            f"({tokenizer.path}): train the reward model from the same SFT model")
        reward_model.eval().requires_grad_(False).to(dist.device)   # frozen: scores only
    rules = active_rules(args)
    if reward_model is None and not rules:
        raise UserError("no reward: pass --reward_model PATH (train_reward.py writes {out_dir}/reward_{dim}.pth) "
                        "and/or a rule such as --reward_contains TEXT (trainer/rewards.py)")
    dist.print("rewards: " + ", ".join(([f"reward model {path}"] if reward_model is not None else [])
                                       + [name for name, _ in rules]))
    return reward_model, (path if reward_model is not None else None), rules


def score_completions(batch, tokenizer, reward_model, rules, autocast):
    """(N, K) raw rewards of a rollout batch (trainer/rl.py pack_rollout), one column per reward function, and
    their names. The total reward is the sum of the columns (TRL's reward_weights, all 1)."""
    from trainer.rl import reward_model_scores
    columns, names = [], []
    if reward_model is not None:
        columns.append(reward_model_scores(reward_model, batch, autocast))
        names.append("reward_model")
    lengths = batch["completion_lengths"].tolist()
    texts = [tokenizer.decode([t for t in row[:n] if t != EOS_ID])
             for row, n in zip(batch["completions"].tolist(), lengths)]
    device = batch["input_ids"].device
    for name, rule in rules:
        columns.append(torch.tensor([rule(text, n) for text, n in zip(texts, lengths)], device=device))
        names.append(name)
    return torch.stack(columns, dim=1).float(), names

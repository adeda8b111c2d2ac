"""Rule rewards: a number for each answer computed by a rule instead of (or next to) a reward model.

Each rule has a flag; giving the flag switches the rule on, and its value parameterises it:

    --reward_contains "Deep TinyMind"   1 if the answer's text contains the string, else 0
    --reward_length 40                  -|n - 40| / 40 for an answer of n tokens (0 at exactly 40 tokens)

To add one: write `def my_rule(value, text, n_tokens) -> float` and add a RuleReward line to RULE_REWARDS.
MiniMind's GRPO/PPO use rules like these (answer length, <think> format, a repetition penalty) on top of an
external reward model; TRL calls them reward functions and logs each one as rewards/<name>/mean and /std.
"""
from dataclasses import dataclass

from trainer.cli import positive_int


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
    g = parser.add_argument_group("rule rewards (trainer/rewards.py; each flag switches its rule on)")
    for rule in RULE_REWARDS.values():
        g.add_argument(rule.flag, type=rule.type, default=None, help=rule.help)


def active_rules(args):
    """[(name, function(text, n_tokens) -> float)] of the rules whose flag was given."""
    out = []
    for name, rule in RULE_REWARDS.items():
        value = getattr(args, rule.flag.lstrip("-"))
        if value is not None:
            out.append((name, lambda text, n, f=rule.function, v=value: f(v, text, n)))
    return out

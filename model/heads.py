"""A Transformer with a scalar head instead of the language-model head: the reward model (and PPO's critic).

    tokens -> Transformer body -> final RMSNorm -> h_t (dim) -> score: Linear(dim, 1) -> s_t, one number a position

The reward of a whole answer is s_t read at ONE position: the last token of the sequence, the </s> that ends
the answer (InstructGPT, https://arxiv.org/abs/2203.02155, section 3.5; Hugging Face's
*ForSequenceClassification reads the last non-pad token the same way). Causal attention means that position
has seen the prompt and the whole answer. PPO's critic is the same network read at EVERY position: s_t is the
value V(s_t) of the state before the token that position predicts.

The body starts from the SFT model (it already understands the chat format); the LM head is dropped (as in
Hugging Face's sequence-classification models), so the checkpoint holds the body and the score head only.
"""
from torch import nn

from .config import ModelConfig
from .model import Transformer


class RewardModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.body = Transformer(cfg)
        self.body.output = None   # no LM head: forward(return_hidden=True) never uses it
        # No bias: the pairwise loss only sees reward differences, a bias would cancel out of every one.
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)   # the body's initialisation (GPT-2's)

    @classmethod
    def from_language_model(cls, model: Transformer):
        """A reward model whose body is `model`'s weights (e.g. the SFT model) and whose head is fresh."""
        reward_model = cls(model.cfg)
        body = {k: v for k, v in model.state_dict().items() if not k.startswith("output.")}
        reward_model.body.load_state_dict(body, strict=True)
        return reward_model

    @property
    def layers(self):
        """The body's transformer blocks (FSDP shards the model block by block: trainer/fsdp.py)."""
        return self.body.layers

    def set_grad_checkpointing(self, enabled):
        """Recompute the body's blocks in the backward pass (the shared loop's --grad_checkpointing)."""
        self.body.set_grad_checkpointing(enabled)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids):
        """input_ids (B, T) -> scores (B, T), float32: the head's output at every position."""
        hidden = self.body(input_ids, return_hidden=True)
        return self.score(hidden).squeeze(-1).float()


def rewards_at(scores, last_index):
    """The reward of each row: scores (B, T) read at last_index (B,), the position of the row's final </s>."""
    return scores.gather(1, last_index.unsqueeze(1)).squeeze(1)

from dataclasses import asdict, dataclass, fields
from typing import Optional


class ConfigError(ValueError):
    """A model shape that cannot be built (e.g. dim not divisible by n_heads): a user mistake, one line."""


@dataclass
class ModelConfig:
    """Everything that defines the network's shape. Saved inside every checkpoint, so later stages and
    eval_model.py rebuild the same model without repeating --dim/--n_layers. Defaults are MiniMind2's."""
    dim: int = 512                      # width of the residual stream
    n_layers: int = 8
    n_heads: int = 8                    # query heads
    n_kv_heads: int = 2                 # key/value heads (grouped-query attention: 4 query heads share one)
    vocab_size: int = 6400
    hidden_dim: Optional[int] = None    # SwiGLU inner width; None -> 8/3 * dim rounded up to a multiple of 64
    max_seq_len: int = 512              # context length trained at (RoPE extends past it on demand)
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_word_embeddings: bool = True    # the output head reuses the token embedding matrix

    def __post_init__(self):
        if self.hidden_dim is None:
            # SwiGLU has 3 matrices instead of 2, so 8/3 * dim keeps the FFN's parameters at those of a
            # 4*dim MLP (https://arxiv.org/abs/2002.05202); a multiple of 64 keeps matmuls aligned.
            # Integer arithmetic: 8 * dim / 3 in floats can land a hair above a multiple of 64.
            self.hidden_dim = 64 * ((8 * self.dim + 3 * 64 - 1) // (3 * 64))
        if self.dim % self.n_heads:
            raise ConfigError(f"--dim {self.dim} must be divisible by --n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"--n_heads {self.n_heads} must be divisible by --n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


# Fields that fix the weights' shapes and meaning: a checkpoint and the command line must agree on them.
# (max_seq_len and dropout are training choices: SFT-1024 continues from a 512-token pretrain.)
ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "rope_theta",
               "norm_eps", "tie_word_embeddings")

"""LoRA: fine-tune a few low-rank matrices instead of the whole model (https://arxiv.org/abs/2106.09685).

A frozen linear layer W (out x in) gets a trainable update of rank r:

    y = W x + (alpha / r) * B A x          A: (r, in), B: (out, r), r << in, out

A starts random (Kaiming, as nn.Linear's own init) and B at zero, so B A = 0: the adapted model starts exactly
equal to the base model, and only A and B (r * (in + out) numbers per layer instead of in * out) get gradients
and optimizer state. alpha / r keeps the update's scale the same when r changes.

Three things make LoRA more than a memory trick, and all three are here:
  - the adapters alone are the fine-tune: `lora_state_dict` is a few MB, the base checkpoint stays untouched;
  - `merge_lora` folds B A into W, so the merged model is a plain Transformer at no extra inference cost;
  - `adapters_disabled(model)` gives back the base model without a copy of it: DPO's frozen reference for free.
"""
import contextlib
import math

import torch
from torch import nn

# The linear layers of a block, by their names in model/model.py. Default: all of them.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Linear):
    """An nn.Linear whose frozen weight is the base layer's own Parameter (same object, same state-dict key
    `.weight`), plus the trainable `lora_A`, `lora_B`. So a base checkpoint loads into it unchanged."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        nn.Module.__init__(self)   # not nn.Linear.__init__: it would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)    # our model has no biases
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # nn.Linear's init, as in the paper's code
        self.dropout = nn.Dropout(dropout)
        self.enabled = True     # False: behave as the base layer (adapters_disabled)
        self.merged = False     # True: B A has been added into weight (merge); the adapters must not add it again

    def forward(self, x):
        y = nn.functional.linear(x, self.weight)
        if self.enabled and not self.merged:
            # (x A^T) B^T: two thin matmuls, never the (out x in) product B A.
            y = y + nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y

    def delta(self):
        """The update B A * alpha / r as a full (out x in) matrix, in the weight's dtype."""
        return (self.lora_B @ self.lora_A * self.scale).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta()
            self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def add_lora(model, rank, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Wrap the target linear layers of every block in LoRALinear and freeze everything else. Returns the number
    of trainable (adapter) parameters. Load the base weights BEFORE calling this."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}: choose from {', '.join(LORA_TARGETS)}")
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapters_only(state_dict):
    """The adapters of a full state dict: {'layers.0.attention.wq.lora_A': ..., ...}."""
    return {k: v for k, v in state_dict.items() if ".lora_" in k}


def lora_state_dict(model):
    """Only the adapters of a model, as a state dict of copies."""
    return {k: v.detach().clone() for k, v in adapters_only(model.state_dict()).items()}


def load_lora(model, state_dict):
    """Load adapters saved by lora_state_dict into a model that add_lora has wrapped the same way. Strict: a
    missing or unexpected adapter is an error."""
    mine = {k for k in model.state_dict() if ".lora_" in k}
    missing, unexpected = sorted(mine - set(state_dict)), sorted(set(state_dict) - mine)
    if missing or unexpected:
        raise ValueError(f"LoRA adapters do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state_dict, strict=False)   # strict=False: the base weights are not in this dict


def merge_lora(model):
    """Fold every adapter into its base weight and put a plain nn.Linear back: the result is an ordinary
    Transformer whose state dict has no lora_ keys (a normal stage checkpoint)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device=child.weight.device)
                plain.weight = child.weight
                setattr(module, name, plain)
    return model


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside this block the model computes the base model's function (the adapters add nothing)."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters are merged into the weights: unmerge them before disabling")
    states = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state


class BaseModel:
    """The adapted model seen with its adapters switched off: the base model, computed from the very same
    weights, with no second copy in memory. With LoRA this is DPO's frozen reference (the starting model)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

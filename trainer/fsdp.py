"""FSDP2 (`--fsdp`): shard the parameters, gradients and optimizer states over the processes (like ZeRO-3),
with PyTorch's own `fully_shard` (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html).

DDP keeps a whole copy of the model, its gradients and both AdamW moments on every GPU: 16 bytes a parameter
in float32. FSDP keeps 1/N of each on each of N processes and all-gathers one block's weights just before the
block runs (forward and backward), then frees them again; gradients are reduce-scattered so each process only
holds and updates its own shard. Per-process memory for the model state drops from 16 B to 16/N B a parameter.

fully_shard works in place: the Transformer stays a Transformer (same parameter names, same state-dict keys),
its parameters become DTensors (each process holds a shard). So checkpoints are gathered to full tensors
before saving: the files are the same as without FSDP. It runs on CPU with gloo, so tests run without GPUs.

PyTorch's FSDP and distributed-checkpoint modules are imported inside the functions that use them: importing
them costs ~2 s per process (measured: `import torch` 2.6 s, with torch.distributed.fsdp 4.6 s), which every
stage script, eval_model.py and test run would otherwise pay without --fsdp.
"""
import sys

import torch


def full_options():
    """Full (unsharded) tensors, on CPU: what a checkpoint file holds. Every process takes part in gathering them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model, precision):
    """Shard each transformer block, then the root (embeddings, final norm and the tied head), in place.

    One unit per block means only one block's full weights exist at a time (plus the root's). Under bfloat16
    on CUDA the weights are gathered and used in bfloat16 and gradients are reduced in float32 (the master
    weights and the optimizer stay float32), as autocast would do without FSDP."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = None
    if precision.device_type == "cuda" and precision.dtype == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp else {}
    for block in model.layers:
        fully_shard(block, **kwargs)
    # The root keeps its gathered weights after forward by default (backward needs them next). A frozen
    # model (DPO's reference) never runs backward, so it would keep them for good: reshard explicitly.
    fully_shard(model, reshard_after_forward=True, **kwargs)
    return model


def is_sharded(model):
    # No process that never imported torch.distributed.fsdp (shard_model does) can hold a sharded model.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def full_model_state(model):
    """The full state dict of a sharded model (a collective: every process must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=full_options())


def full_optimizer_state(model, optimizer):
    """The full optimizer state of a sharded model, keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=full_options())


def load_full_state(model, optimizer, model_state, optimizer_state, strict=True):
    """Load full state dicts (from a checkpoint) into a sharded model and its optimizer: each process keeps
    its own shard. strict=False: `model_state` holds only part of the weights (LoRA's adapters)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=strict))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def full_norm(norm):
    """clip_grad_norm_ of sharded gradients returns a DTensor: the total norm as a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

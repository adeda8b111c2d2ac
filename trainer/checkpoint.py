"""Checkpoints: the stage output (weights + config) and the resume file (everything needed to continue).

    {out_dir}/{stage}_{dim}.pth          {"model": state_dict, "config": ModelConfig dict, "stage", "step"}
    {out_dir}/{stage}_{dim}_resume.pth   the above + optimizer, scaler, step, data position, RNG states,
                                         wandb run id

Both are written atomically (temporary file, then rename), so a crash mid-write never leaves a truncated
checkpoint behind. Loads are strict: a missing or unexpected key is an error, never silently skipped.
"""
import os

import torch

from model import ARCH_FIELDS, ModelConfig, Transformer


def stage_path(out_dir, stage, dim):
    return os.path.join(out_dir, f"{stage}_{dim}.pth")


def resume_path(out_dir, stage, dim):
    return os.path.join(out_dir, f"{stage}_{dim}_resume.pth")


def atomic_save(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def clean_state_dict(state_dict):
    """Strip the wrappers' prefixes: DDP adds 'module.', torch.compile adds '_orig_mod.'."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def unwrap(model):
    """The plain Transformer inside DDP and/or torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def model_payload(model, stage, step):
    model = unwrap(model)
    return {"model": clean_state_dict(model.state_dict()), "config": model.cfg.to_dict(), "stage": stage,
            "step": step}


def read_checkpoint(path, stage_hint=None):
    """torch.load a checkpoint with a helpful error when it is missing."""
    if not os.path.isfile(path):
        hint = f"\n{stage_hint}" if stage_hint else ""
        raise FileNotFoundError(f"checkpoint not found: {path}{hint}")
    return torch.load(path, map_location="cpu", weights_only=False)


def config_from_checkpoint(ckpt, path, flags=None):
    """The checkpoint's ModelConfig; `flags` (a dict of architecture values given on the command line, None
    meaning 'not given') must agree with it. Training-time fields (max_seq_len, dropout) may be overridden."""
    if "config" not in ckpt:
        raise ValueError(f"{path} holds no model config (a weights-only file?): it was not written by TinyMind")
    cfg = ModelConfig.from_dict(ckpt["config"])
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name in ARCH_FIELDS and getattr(cfg, name) != value:
            raise ValueError(f"--{name} {value} conflicts with the checkpoint {path}, which has {name}="
                             f"{getattr(cfg, name)}. Drop the flag (the config comes from the checkpoint) or "
                             f"pick another checkpoint.")
        if name not in ARCH_FIELDS:
            setattr(cfg, name, value)
    return cfg


def load_model(path, flags=None, stage_hint=None):
    """Build a Transformer from a stage checkpoint: config from the file (checked against `flags`), weights
    loaded strictly. Returns (model, cfg, checkpoint dict)."""
    ckpt = read_checkpoint(path, stage_hint)
    cfg = config_from_checkpoint(ckpt, path, flags)
    model = Transformer(cfg)
    model.load_state_dict(clean_state_dict(ckpt["model"]), strict=True)
    return model, cfg, ckpt

"""Checkpoints: the stage output (weights + config) and the resume file (everything needed to continue).

    {out_dir}/{stage}_{dim}.pth          {"model": state_dict, "config": ModelConfig dict, "stage", "step",
                                          "tokenizer": {"json": tokenizer.json text, "source": its path}}
    {out_dir}/{stage}_{dim}_resume.pth   the above + optimizer, scaler, step, data position, RNG states,
                                         wandb run id

Both are written atomically (temporary file, then rename), so a crash mid-write never leaves a truncated
checkpoint behind. Loads are strict: a missing or unexpected key is an error, never silently skipped.
"""
import glob
import os

import torch

from dataset.jsonl import what_is_there
from model import ARCH_FIELDS, ModelConfig, Transformer
from model.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from trainer.cli import UserError

# What writes each stage's checkpoint, for "not found" messages.
STAGE_COMMANDS = {"pretrain": "python train_pretrain.py", "full_sft": "python train_full_sft.py",
                  "rlhf": "python train_dpo.py", "reward": "python train_reward.py"}


def stage_path(out_dir, stage, dim):
    return os.path.join(out_dir, f"{stage}_{dim}.pth")


def resume_path(out_dir, stage, dim):
    return os.path.join(out_dir, f"{stage}_{dim}_resume.pth")


def stage_checkpoints(out_dir, stage):
    """The stage outputs {out_dir}/{stage}_{dim}.pth that exist (resume files excluded), sorted."""
    paths = glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(stage)}_*.pth"))
    return sorted(p for p in paths if os.path.basename(p)[len(stage) + 1:-4].isdigit())


def find_stage_checkpoint(out_dir, stage, dim=None, flag="--init_from"):
    """The checkpoint a later stage starts from when none is named: {out_dir}/{stage}_{dim}.pth for a given
    --dim, else the single {stage}_*.pth in out_dir. None found or several: a UserError saying which exist
    and which flag picks one (MiniMind2 defaulted to dim 512 and failed next to full_sft_128.pth)."""
    found = stage_checkpoints(out_dir, stage)
    if dim is not None:
        path = stage_path(out_dir, stage, dim)
        if os.path.isfile(path):
            return path
        others = f"; {out_dir} has {', '.join(found)} (drop --dim to use it)" if len(found) == 1 else (
            f"; {out_dir} has {', '.join(found)}" if found else "")
        raise UserError(f"checkpoint not found: {path}{others}. It is written by `{STAGE_COMMANDS.get(stage, stage)} "
                        f"--dim {dim} --out_dir {out_dir}`, or pass {flag} PATH")
    if len(found) == 1:
        return found[0]
    if found:
        dims = ", ".join(os.path.basename(p)[len(stage) + 1:-4] for p in found)
        raise UserError(f"several {stage} checkpoints in {out_dir} ({', '.join(found)}): choose one with "
                        f"--dim ({dims}) or {flag} PATH")
    raise UserError(f"no {stage} checkpoint in {out_dir} ({stage_path(out_dir, stage, '<dim>')}). It is written by "
                    f"`{STAGE_COMMANDS.get(stage, stage)} --out_dir {out_dir}` (or `make demo`), or pass {flag} PATH")


def config_difference(saved, current, fields=None):
    """'dim 64 in the file vs 128 now' for the config fields (all, or `fields`) where two config dicts differ."""
    keys = sorted(fields or set(saved) | set(current))
    return "; ".join(f"{k} {saved.get(k)} in the file vs {current.get(k)} now" for k in keys
                     if saved.get(k) != current.get(k))


def atomic_save(obj, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):  # interrupted (a second Ctrl-C) or failed mid-write: leave no half file behind
            os.remove(tmp)


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


def model_payload(model, stage, step, state_dict=None, tokenizer=None):
    """What a stage checkpoint holds. `state_dict`: the weights when they had to be gathered (FSDP).
    `tokenizer`: the Tokenizer the model was trained with; its tokenizer.json text goes into the file, so the
    ids keep their meaning wherever the checkpoint goes (later stages, eval_model.py, the export)."""
    model = unwrap(model)
    weights = clean_state_dict(state_dict if state_dict is not None else model.state_dict())
    payload = {"model": weights, "config": model.cfg.to_dict(), "stage": stage, "step": step}
    if tokenizer is not None:
        payload["tokenizer"] = {"json": tokenizer.json_text, "source": tokenizer.path}
    return payload


def checkpoint_tokenizer(ckpt, path, tokenizer_path=None):
    """The tokenizer a model loaded from the checkpoint `path` must use: the copy inside the checkpoint.
    --tokenizer_path (`tokenizer_path`) may name the same tokenizer again; another one is refused, since the
    model's ids would silently mean other text. Checkpoints from before tokenizers travelled with them carry
    none: they were trained with the default tokenizer, or with the one --tokenizer_path names."""
    given = Tokenizer(tokenizer_path) if tokenizer_path else None
    if "tokenizer" not in ckpt:
        tokenizer = given or Tokenizer(DEFAULT_TOKENIZER)
        vocab_size = (ckpt.get("config") or {}).get("vocab_size", tokenizer.vocab_size)
        if tokenizer.vocab_size > vocab_size:  # ids past the embedding table: not the model's tokenizer
            raise UserError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens, the model in {path} only "
                            f"{vocab_size}: pass the --tokenizer_path it was trained with")
        return tokenizer
    saved = ckpt["tokenizer"]
    tokenizer = Tokenizer.from_json(saved["json"], saved["source"])
    if given is not None and not given.same_as(tokenizer):
        raise UserError(f"--tokenizer_path {tokenizer_path} differs from the tokenizer the checkpoint {path} was "
                        f"trained with (from {saved['source']}): drop --tokenizer_path (the checkpoint's is used)")
    return tokenizer


def read_checkpoint(path, stage_hint=None):
    """torch.load a checkpoint with a helpful error when it is missing."""
    if not os.path.isfile(path):
        hint = f". {stage_hint}" if stage_hint else ""
        raise UserError(f"checkpoint not found: {path}{what_is_there(path, '.pth')}{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt/foreign file: say which file, not pickle's traceback
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def config_from_checkpoint(ckpt, path, flags=None):
    """The checkpoint's ModelConfig; `flags` (a dict of architecture values given on the command line, None
    meaning 'not given') must agree with it. Training-time fields (max_seq_len, dropout) may be overridden."""
    if "config" not in ckpt:
        raise UserError(f"{path} holds no model config (a weights-only file?): it was not written by TinyMind")
    cfg = ModelConfig.from_dict(ckpt["config"])
    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name in ARCH_FIELDS and getattr(cfg, name) != value:
            raise UserError(f"--{name} {value} conflicts with the checkpoint {path}, which has {name}="
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


def load_reward_model(path, flags=None):
    """Build a RewardModel (model/heads.py) from a checkpoint written by train_reward.py, loaded strictly.
    Returns (model, cfg, checkpoint dict)."""
    from model.heads import RewardModel
    ckpt = read_checkpoint(path, f"It is written by `{STAGE_COMMANDS['reward']}`")
    if "score.weight" not in ckpt.get("model", {}):
        raise UserError(f"{path} is not a reward model (a {ckpt.get('stage')} checkpoint, no score head): "
                        f"train one with `{STAGE_COMMANDS['reward']}`")
    cfg = config_from_checkpoint(ckpt, path, flags)
    model = RewardModel(cfg)
    model.load_state_dict(clean_state_dict(ckpt["model"]), strict=True)
    return model, cfg, ckpt


def attach_lora(model, path):
    """Add the adapters saved by train_lora.py (or LoRA DPO) at `path` to `model`, a loaded base model. Their
    base config must be the model's. Returns the file's 'lora' settings."""
    from model.lora import add_lora, load_lora
    ckpt = read_checkpoint(path)
    if "lora" not in ckpt:
        raise UserError(f"{path} holds no LoRA adapters (it is a {ckpt.get('stage')} checkpoint)")
    difference = config_difference(ckpt["config"], model.cfg.to_dict(), ARCH_FIELDS)
    if difference:
        raise UserError(f"the adapters {path} were trained on another model ({difference})")
    lora = ckpt["lora"]
    add_lora(model, lora["rank"], lora["alpha"], targets=lora["targets"])
    load_lora(model, ckpt["model"])
    return lora

"""Models in and out of TinyMind: a plain Hugging Face Llama directory, and MiniMind2's checkpoints.

    python scripts/convert_model.py export out/full_sft_768.pth hf/tinymind-768            # float32
    python scripts/convert_model.py export out/rlhf_768.pth hf/tinymind-768-bf16 --dtype bfloat16
    python scripts/convert_model.py export out/full_sft_64.pth hf/lora --lora_path out/lora/lora_identity_64.pth
    python scripts/convert_model.py import hf/tinymind-768 out/imported_768.pth            # any Llama we can hold
    python scripts/convert_model.py import ../minimind/out/full_sft_512.pth out/full_sft_512.pth \\
        --tokenizer_path ../minimind/model/minimind_tokenizer/tokenizer.json               # MiniMind2 .pth
    python scripts/convert_model.py import ../MiniMind2 out/minimind2.pth                  # MiniMind2 transformers dir

The export loads with AutoModelForCausalLM.from_pretrained(DIR) / AutoTokenizer.from_pretrained(DIR), no
trust_remote_code; its chat template renders what dataset/chat.py renders. An import writes a TinyMind checkpoint
(weights, config, tokenizer) usable as --init_from or eval_model.py --checkpoint. The name mapping and the RoPE
permutation are in model/interchange.py.
"""
import json
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dataset.chat import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from model.interchange import (UnsupportedModel, chat_template, complex_rope_to_rotate_half,  # noqa: E402
                               escaped_tokenizer_json, from_llama_state_dict, llama_config, model_config_from_llama,
                               to_llama_state_dict, unescaped_tokenizer_json)
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer  # noqa: E402
from trainer.checkpoint import (atomic_save, attach_lora, checkpoint_tokenizer, clean_state_dict,  # noqa: E402
                                load_model, model_payload)
from trainer.cli import ArgumentParser, UserError, positive_int, run_main  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# MiniMind2's LMConfig defaults, for its bare .pth state dicts (which hold no config).
MINIMIND2_DEFAULTS = {"n_heads": 8, "rope_theta": 1e6, "norm_eps": 1e-5}
MINIMIND2_TRAINED_LEN = 512   # the context MiniMind2 pretrained at (its config's max_seq_len is the RoPE table)


# ---- export ---------------------------------------------------------------------------------------------------

def model_card(ckpt, ckpt_path, out_dir, cfg, n_params, dtype_name, lora_path):
    args = ckpt.get("args") or {}
    lines = [f"# TinyMind {cfg.dim}", "",
             f"A Llama-architecture causal language model trained with TinyMind, exported from `{ckpt_path}`.", "",
             "## Architecture", "",
             f"- {n_params:,} parameters ({n_params / 1e6:.2f}M), stored as {dtype_name}",
             f"- {cfg.n_layers} layers, width {cfg.dim}, {cfg.n_heads} query heads / {cfg.n_kv_heads} key-value "
             f"heads (head_dim {cfg.head_dim}), SwiGLU feed-forward {cfg.hidden_dim}",
             f"- RMSNorm eps {cfg.norm_eps:g}, RoPE theta {cfg.rope_theta:g}, trained context {cfg.max_seq_len}, "
             f"vocabulary {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'separate'} output head", "",
             "## Training", "",
             f"- stage: {ckpt.get('stage')}, optimizer steps: {ckpt.get('step')}"]
    if ckpt.get("tokens_seen") is not None:
        lines.append(f"- tokens seen in this stage: {ckpt['tokens_seen']:,}")
    for key, what in (("data_path", "data"), ("init_from", "started from"), ("tokenizer_path", "tokenizer flag")):
        if args.get(key):
            lines.append(f"- {what}: `{args[key]}`")
    for stage_info in ("dpo", "lora", "merged_lora", "imported_from"):
        if stage_info in ckpt:
            lines.append(f"- {stage_info}: `{json.dumps(ckpt[stage_info], ensure_ascii=False, default=str)}`")
    if lora_path:
        lines.append(f"- LoRA adapters `{lora_path}` merged into the weights")
    if "_argv" in args:
        lines.append(f"- command line flags: `{' '.join(map(str, args['_argv']))}`")
    if "tokenizer" in ckpt:
        lines.append(f"- tokenizer: `{ckpt['tokenizer']['source']}`")
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"tok, model = AutoTokenizer.from_pretrained({out_dir!r}), AutoModelForCausalLM.from_pretrained("
              f"{out_dir!r})",
              "ids = tok.apply_chat_template([{'role': 'user', 'content': '你好'}], add_generation_prompt=True, "
              "return_tensors='pt', return_dict=True)",
              "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0][ids['input_ids'].shape[1]:], "
              "skip_special_tokens=True))", "```", "",
              "The chat template reproduces TinyMind's `render_chat` token for token (default system prompt "
              "included).", ""]
    return "\n".join(lines)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def export(ckpt_path, out_dir, dtype_name, lora_path=None, system_prompt=None):
    from safetensors.torch import save_file
    model, cfg, ckpt = load_model(ckpt_path)
    if "lora" in ckpt:
        raise UserError(f"{ckpt_path} holds only LoRA adapters: export their base model with "
                        f"--lora_path {ckpt_path}")
    tokenizer = checkpoint_tokenizer(ckpt, ckpt_path)
    if lora_path:
        from model.lora import merge_lora
        attach_lora(model, lora_path)
        merge_lora(model)
    if os.path.isfile(out_dir):
        raise UserError(f"{out_dir} is a file: the export is a directory, name another")
    os.makedirs(out_dir, exist_ok=True)
    dtype = DTYPES[dtype_name]
    weights = {k: v.detach().to(dtype).contiguous() for k, v in to_llama_state_dict(model.state_dict(), cfg).items()}
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    if system_prompt is None:  # what the checkpoint's stage trained with (SFT/DPO record it), else the default
        system_prompt = (ckpt.get("args") or {}).get("system_prompt", DEFAULT_SYSTEM_PROMPT)
    extra = {"stage": ckpt.get("stage"), "step": ckpt.get("step"), "dropout": cfg.dropout}
    write_json(os.path.join(out_dir, "config.json"), llama_config(cfg, dtype_name, extra))
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": True,
                "temperature": 0.85, "top_p": 0.85})   # eval_model.py's sampling defaults
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(escaped_tokenizer_json(tokenizer.json_text))
    unk, bos, eos = (tokenizer.id_to_token(i) for i in (PAD_ID, BOS_ID, EOS_ID))
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": unk}
    write_json(os.path.join(out_dir, "special_tokens_map.json"), specials)
    write_json(os.path.join(out_dir, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False,
                "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len,
                "chat_template": chat_template(system_prompt, bos, eos)})
    n_params = model.num_parameters()
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(ckpt, ckpt_path, out_dir, cfg, n_params, dtype_name, lora_path))
    size = os.path.getsize(os.path.join(out_dir, "model.safetensors"))
    print(f"exported {ckpt_path} ({n_params / 1e6:.2f}M parameters, {dtype_name}) -> {out_dir} "
          f"(model.safetensors {size / 1e6:.1f} MB)")


# ---- import ---------------------------------------------------------------------------------------------------

def read_weights(path):
    """A state dict from a .safetensors / .bin / .pth file (a TinyMind checkpoint gives its 'model')."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated or foreign file: name it, without pickle's traceback
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}: {e})") from None


def directory_weights(src):
    """The state dict of a transformers directory: model.safetensors (or its shards), or pytorch_model.bin."""
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_weights(os.path.join(src, shard)))
        return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(src, name)):
            return read_weights(os.path.join(src, name))
    raise UserError(f"{src} holds no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def refuse_moe(src, state, config):
    moe_keys = [k for k in state if ".experts." in k or re.search(r"(feed_forward|mlp)\.gate\.", k)]
    by_name = re.search(r"_moe\.(pth|bin|safetensors)$", src)
    if config.get("use_moe") or moe_keys or by_name:
        why = f"{moe_keys[0]}, ..." if moe_keys else "use_moe in config.json" if config.get("use_moe") else \
            "its file name"
        raise UserError(f"{src} is a mixture-of-experts (MoE) model ({why}): TinyMind has dense feed-forward "
                        f"layers only; import a dense checkpoint")


def minimind2_config(state, config, n_heads, src):
    """ModelConfig of a MiniMind2 state dict (our names): from its config.json fields (LMConfig's names) where
    given, else inferred from the shapes with --n_heads (MiniMind2's default 8), checked against them."""
    if "tok_embeddings.weight" not in state or "layers.0.attention.wq.weight" not in state:
        raise UserError(f"{src}: not a MiniMind2 model (no tok_embeddings.weight / layers.0.attention.wq.weight)")
    vocab_size, dim = state["tok_embeddings.weight"].shape
    heads = config.get("n_heads", n_heads or MINIMIND2_DEFAULTS["n_heads"])
    if n_heads and heads != n_heads:
        raise UserError(f"--n_heads {n_heads} conflicts with {src}'s config (n_heads {heads}): drop the flag")
    if dim % heads or (dim // heads) % 2 or state["layers.0.attention.wq.weight"].shape[0] != dim:
        raise UserError(f"{src}: width {dim} does not split into {heads} heads of even size: pass the model's "
                        f"--n_heads")
    kv_rows = state["layers.0.attention.wk.weight"].shape[0]
    head_dim = dim // heads
    if kv_rows % head_dim or heads % (kv_rows // head_dim):
        raise UserError(f"{src}: wk has {kv_rows} rows, not a whole number of {head_dim}-wide key/value heads "
                        f"dividing {heads} query heads: pass the model's --n_heads")
    n_layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    tied = "output.weight" not in state or torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_rows // head_dim,
                       vocab_size=vocab_size, hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0],
                       max_seq_len=MINIMIND2_TRAINED_LEN,
                       rope_theta=float(config.get("rope_theta", MINIMIND2_DEFAULTS["rope_theta"])),
                       norm_eps=float(config.get("norm_eps", MINIMIND2_DEFAULTS["norm_eps"])),
                       tie_word_embeddings=tied)


def from_minimind2(state, cfg):
    """MiniMind2 (complex-number RoPE) weights -> ours: wq/wk rows permuted inside each head. Buffers derived
    from the config (the RoPE table pos_cis, the causal mask), which some versions saved, are dropped."""
    state = {k: v for k, v in state.items() if k != "pos_cis" and not k.endswith("attention.mask")}
    for key in state:
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            state[key] = complex_rope_to_rotate_half(state[key], cfg.head_dim)
    if cfg.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def import_tokenizer(src_dir, tokenizer_path, src):
    """The tokenizer an import carries: --tokenizer_path, else the directory's tokenizer.json (an export's
    escaping undone). Both given and different: refused."""
    found = os.path.join(src_dir, "tokenizer.json") if src_dir else None
    from_dir = None
    if found and os.path.isfile(found):
        with open(found, encoding="utf-8", newline="") as f:
            from_dir = Tokenizer.from_json(unescaped_tokenizer_json(f.read()), found)
    if tokenizer_path:
        given = Tokenizer(tokenizer_path)
        if from_dir is not None and not given.same_as(from_dir):
            raise UserError(f"--tokenizer_path {tokenizer_path} differs from {found}: drop the flag to use the "
                            f"directory's, or remove it from the directory")
        return given
    if from_dir is None:
        raise UserError(f"{src} comes without a tokenizer.json: pass --tokenizer_path (for MiniMind2: its "
                        f"model/tokenizer.json or model/minimind_tokenizer/tokenizer.json)")
    return from_dir


def stage_from_name(src):
    """pretrain_768.pth -> "pretrain" (eval_model.py continues text for it, chats otherwise)."""
    name = os.path.basename(os.path.normpath(src))
    return next((s for s in ("pretrain", "full_sft", "rlhf", "reason", "full_dist") if name.startswith(s)),
                "imported")


def read_source(src):
    """(config.json dict or {}, state dict) of a transformers directory or a bare state-dict file."""
    if not os.path.exists(src):
        raise UserError(f"not found: {src} (a Hugging Face Llama directory, a MiniMind2 .pth, or a MiniMind2 "
                        f"transformers directory)")
    if os.path.isdir(src):
        config_path = os.path.join(src, "config.json")
        if not os.path.isfile(config_path):
            raise UserError(f"{src} has no config.json: not a transformers model directory")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        return config, clean_state_dict(directory_weights(src))
    state = read_weights(src)
    if isinstance(state, dict) and "model" in state and "config" in state:
        raise UserError(f"{src} is already a TinyMind checkpoint: use it as it is")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{src} is not a state dict (a dict of parameter names to tensors)")
    return {}, clean_state_dict(state)


def from_llama(state, config, max_seq_len):
    """(ModelConfig, our state dict) of a Llama-named state dict: our exports, other Llamas, later MiniMind."""
    if any(".q_norm." in k or ".k_norm." in k for k in state):
        raise UnsupportedModel("per-head q_norm/k_norm (Qwen3-style attention) are not supported")
    if config.get("model_type") == "minimind":   # Llama's field names; its FFN width may be left to its code
        gate = state.get("model.layers.0.mlp.gate_proj.weight")
        config = {"tie_word_embeddings": True, **config, "rope_scaling": None,
                  "max_position_embeddings": MINIMIND2_TRAINED_LEN,
                  "intermediate_size": config.get("intermediate_size") or (gate.shape[0] if gate is not None else None)}
    cfg = model_config_from_llama(config, max_seq_len)
    state = dict(state)
    tied_copy = state.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    if tied_copy is not None and not torch.equal(tied_copy, state.get("model.embed_tokens.weight")):
        raise UnsupportedModel("tie_word_embeddings is true but lm_head.weight differs from "
                               "model.embed_tokens.weight (a tie mismatch)")
    state = from_llama_state_dict(state, cfg.n_layers)
    if cfg.tie_word_embeddings:
        state["output.weight"] = state.get("tok_embeddings.weight")
    return cfg, state


def model_from_state(state, cfg, src):
    """A Transformer(cfg) holding `state`; missing, unexpected or misshapen weights are named."""
    model = Transformer(cfg)
    expected = model.state_dict()
    missing = sorted(k for k in expected if state.get(k) is None)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise UserError(f"{src}: the weights do not fit the config ({cfg.n_layers} layers): missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(f"{src}: {key} has shape {tuple(state[key].shape)}, the config (dim {cfg.dim}, "
                            f"{cfg.n_heads}/{cfg.n_kv_heads} heads, ffn {cfg.hidden_dim}, vocab {cfg.vocab_size}) "
                            f"needs {tuple(tensor.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)   # float32 master weights
    return model


def import_model(src, out_path, tokenizer_path=None, n_heads=None, max_seq_len=None):
    config, state = read_source(src)
    refuse_moe(src, state, config)
    model_type = config.get("model_type", "minimind")   # a bare .pth: MiniMind2's
    stage, step = stage_from_name(src), 0
    try:
        if model_type == "llama" or (model_type == "minimind" and "model.embed_tokens.weight" in state):
            cfg, state = from_llama(state, config, max_seq_len)
            if n_heads and n_heads != cfg.n_heads:
                raise UserError(f"--n_heads {n_heads} conflicts with {src}/config.json (num_attention_heads "
                                f"{cfg.n_heads}): drop the flag")
            extra = config.get("tinymind") or {}   # our own export: the stage and step it came from
            stage, step = extra.get("stage") or stage, extra.get("step") or step
        elif model_type == "minimind":
            cfg = minimind2_config(state, config, n_heads, src)
            cfg.max_seq_len = max_seq_len or cfg.max_seq_len
            state = from_minimind2(state, cfg)
        else:
            raise UserError(f"{src}/config.json: model_type {model_type!r} is not Llama (LlamaForCausalLM) or "
                            f"MiniMind2 (minimind): cannot import it")
    except UnsupportedModel as e:
        raise UserError(f"{src}: {e}") from None
    model = model_from_state(state, cfg, src)
    tokenizer = import_tokenizer(src if os.path.isdir(src) else None, tokenizer_path, src)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer ({tokenizer.path}) has {tokenizer.vocab_size} tokens, the model only "
                        f"{cfg.vocab_size} embeddings: pass the model's own --tokenizer_path")
    payload = {**model_payload(model, stage, step, tokenizer=tokenizer), "imported_from": os.path.abspath(src)}
    atomic_save(payload, out_path)
    print(f"imported {src} ({model.num_parameters() / 1e6:.2f}M parameters, stage {stage}) -> {out_path}")


def main():
    ap = ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a TinyMind checkpoint -> a Hugging Face Llama directory")
    ex.add_argument("checkpoint", help="a stage checkpoint (or an imported one)")
    ex.add_argument("out_dir", help="the directory to write (created; files in it are overwritten)")
    ex.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' storage type")
    ex.add_argument("--lora_path", default=None, help="LoRA adapters (train_lora.py) to merge into the export")
    ex.add_argument("--system_prompt", default=None,
                    help="the chat template's system prompt for conversations without one ('' for none; default: "
                         "the --system_prompt the checkpoint was trained with, else TinyMind's; MiniMind2: "
                         "'你是 MiniMind，是一个有用的人工智能助手。')")
    im = sub.add_parser("import", help="a Llama directory or a MiniMind2 checkpoint -> a TinyMind checkpoint")
    im.add_argument("src", help="a Llama / MiniMind2 transformers directory, or a MiniMind2 .pth state dict")
    im.add_argument("out", help="the TinyMind checkpoint to write (.pth)")
    im.add_argument("--tokenizer_path", default=None,
                    help="tokenizer.json (default: the directory's; needed for a MiniMind2 .pth)")
    im.add_argument("--n_heads", type=positive_int, default=None,
                    help="query heads of a MiniMind2 .pth (default: its config's, else MiniMind2's 8)")
    im.add_argument("--max_seq_len", type=positive_int, default=None,
                    help=f"context the model was trained at (default: max_position_embeddings; MiniMind2: "
                         f"{MINIMIND2_TRAINED_LEN})")
    args = ap.parse_args()
    if args.command == "export":
        export(args.checkpoint, args.out_dir, args.dtype, args.lora_path, args.system_prompt)
    else:
        import_model(args.src, args.out, args.tokenizer_path, args.n_heads, args.max_seq_len)


if __name__ == "__main__":
    run_main(main)

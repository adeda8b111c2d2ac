"""Our model in other formats: Hugging Face Llama (export and import) and MiniMind2's checkpoints (import).

Our Transformer IS a Llama: pre-norm RMSNorm blocks, rotate-half RoPE, GQA, SwiGLU, optionally tied head. So an
export is a renaming of the same tensors, and `transformers`' LlamaForCausalLM computes the same function:

    tok_embeddings.weight                 model.embed_tokens.weight
    layers.{i}.attention_norm.weight      model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.wq/wk/wv/wo      model.layers.{i}.self_attn.q_proj/k_proj/v_proj/o_proj
    layers.{i}.ffn_norm.weight            model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.feed_forward.w1/w3/w2      model.layers.{i}.mlp.gate_proj/up_proj/down_proj
    norm.weight                           model.norm.weight
    output.weight                         lm_head.weight (absent when tied: the embedding is stored once)

MiniMind2's first release (the `model/model.py` of 2025-02, whose parameter names are ours) rotated ADJACENT
pairs (x_2i, x_2i+1) as complex numbers (torch.polar / view_as_complex); we rotate (x_i, x_i+d/2). Both
rotate pair i by the same angle, so permuting the rows of wq and wk inside each head (2i -> i, 2i+1 -> i + d/2)
gives q and k whose dot products, hence attention, are unchanged (`complex_rope_to_rotate_half`).
MiniMind's later code (`model/model_minimind.py`, Llama names) already rotates halves: no permutation.
"""
import json

import torch

from .config import ModelConfig


class UnsupportedModel(ValueError):
    """A model (or file) this converter cannot represent faithfully; the message names what and why."""


# Per-block names: ours -> Hugging Face Llama's.
LLAMA_BLOCK_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
LLAMA_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


def llama_name(name):
    """Our parameter name -> Hugging Face Llama's."""
    if name in LLAMA_TOP_NAMES:
        return LLAMA_TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)          # "layers", "3", "attention.wq.weight"
    return f"model.layers.{layer}.{LLAMA_BLOCK_NAMES[rest]}"


def to_llama_state_dict(state_dict, cfg):
    """Our state dict -> Llama names. With a tied head, lm_head is left out: Llama ties it back on load."""
    return {llama_name(k): v for k, v in state_dict.items()
            if not (cfg.tie_word_embeddings and k == "output.weight")}


def from_llama_state_dict(llama_state, n_layers):
    """Llama names -> ours. Names we have no place for raise UnsupportedModel (biases, extra norms, ...).
    RoPE's inverse frequencies, which older transformers versions saved, are derived from the config: dropped."""
    llama_state = {k: v for k, v in llama_state.items() if not k.endswith("rotary_emb.inv_freq")}
    ours_by_llama = {llama_name(k): k for k in LLAMA_TOP_NAMES}
    for i in range(n_layers):
        ours_by_llama.update({f"model.layers.{i}.{v}": f"layers.{i}.{k}" for k, v in LLAMA_BLOCK_NAMES.items()})
    unknown = sorted(k for k in llama_state if k not in ours_by_llama)
    if unknown:
        what = "biases" if all(k.endswith(".bias") for k in unknown) else "parameters a Llama block does not have"
        raise UnsupportedModel(f"{what} are not supported: {', '.join(unknown[:4])}"
                               f"{f' (+{len(unknown) - 4} more)' if len(unknown) > 4 else ''}")
    return {ours_by_llama[k]: v for k, v in llama_state.items()}


def llama_config(cfg, dtype_name, extra):
    """config.json of a LlamaForCausalLM with our shape. `extra` ({"stage", "step", "dropout"}) is kept under
    "tinymind" so an import gives back exactly the checkpoint's config and provenance."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older tools (and converters) rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "use_cache": True,
        "dtype": dtype_name,
        "tinymind": extra,
    }


def model_config_from_llama(config, max_seq_len=None):
    """ModelConfig from a Llama config.json dict; every feature we do not have is refused by name."""
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UnsupportedModel("biases (attention_bias / mlp_bias) are not supported: TinyMind's linear layers "
                               "have none")
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config['hidden_act']!r} is not supported (SwiGLU with silu only)")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise UnsupportedModel(f"RoPE scaling {scaling.get('rope_type') or scaling.get('type')!r} is not supported "
                               f"(plain rotate-half RoPE only)")
    if config.get("pretraining_tp", 1) != 1:
        raise UnsupportedModel(f"pretraining_tp {config['pretraining_tp']} is not supported")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if config.get(k) is None]
    if missing:
        raise UnsupportedModel(f"config.json lacks {', '.join(missing)}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise UnsupportedModel(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads = "
                               f"{dim // n_heads} is not supported")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    extra = config.get("tinymind") or {}
    return ModelConfig(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                       n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                       hidden_dim=config["intermediate_size"],
                       max_seq_len=max_seq_len or config.get("max_position_embeddings", 512),
                       rope_theta=float(theta), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                       dropout=float(extra.get("dropout", 0.0)),
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))


def complex_rope_to_rotate_half(weight, head_dim):
    """Rows of a wq/wk trained with adjacent-pair (complex) RoPE, reordered for rotate-half RoPE.

    Inside each head, row 2i (the real part of pair i) moves to row i and row 2i+1 (its imaginary part) to
    row i + head_dim/2: there rotate-half rotates it by the same angle theta_i, with the same signs
    ((a + ib) e^{i t} = (a cos t - b sin t) + i (a sin t + b cos t))."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    rows, cols = weight.shape
    return weight.view(rows // head_dim, head_dim, cols)[:, order].reshape(rows, cols)


# ---- the chat template and the tokenizer it needs -------------------------------------------------------------
# A Jinja template produces ONE string, which the tokenizer then splits on special-token text: "</s>" typed
# inside a message would become the end-of-turn id, where render_chat keeps typed text as text. So the template
# writes every "<" of message text as U+E000 (a private-use character) and the exported tokenizer.json gets a
# normalizer that turns U+E000 back into "<" AFTER the special tokens were matched (they are `normalized: false`:
# matched on the raw text). Message text then tokenizes exactly as render_chat tokenizes it. The one difference:
# a literal U+E000 typed in a message reads as "<" in the export.
ESCAPE = "\ue000"
ESCAPE_NORMALIZER = {"type": "Replace", "pattern": {"String": ESCAPE}, "content": "<"}


def escaped_tokenizer_json(text):
    """Our tokenizer.json text -> the exported one (ESCAPE_NORMALIZER first, then any normalizer it had)."""
    spec = json.loads(text)
    if any(not t.get("special") or t.get("normalized") for t in spec.get("added_tokens", [])):
        raise UnsupportedModel("the tokenizer has added tokens that are not special or are matched after "
                               "normalisation: the chat template's escaping would not hold")
    old = spec.get("normalizer")
    spec["normalizer"] = ESCAPE_NORMALIZER if old is None else {"type": "Sequence",
                                                                "normalizers": [ESCAPE_NORMALIZER, old]}
    return json.dumps(spec, ensure_ascii=False, indent=2)


def unescaped_tokenizer_json(text):
    """The inverse of escaped_tokenizer_json (other tokenizer.json texts are returned unchanged)."""
    spec = json.loads(text)
    norm = spec.get("normalizer")
    if norm == ESCAPE_NORMALIZER:
        spec["normalizer"] = None
    elif norm and norm.get("type") == "Sequence" and norm["normalizers"][:1] == [ESCAPE_NORMALIZER]:
        rest = norm["normalizers"][1:]
        spec["normalizer"] = rest[0] if len(rest) == 1 else {"type": "Sequence", "normalizers": rest}
    else:
        return text
    return json.dumps(spec, ensure_ascii=False)


def chat_template(system_prompt, bos, eos):
    """A Jinja chat_template that renders what dataset/chat.py's render_chat renders, token for token:

        <s>system\\n{system}</s>\\n<s>user\\n{question}</s>\\n<s>assistant\\n{answer}</s>\\n ... [<s>assistant\\n]

    `system_prompt` is used when the conversation has none (None or '': no system block); bos/eos are the names
    of ids 1 and 2 in the tokenizer file."""
    def text(s):   # a Jinja string literal (JSON's escapes are Jinja's)
        return json.dumps(s, ensure_ascii=False)

    def block(role, content):   # one turn; message text gets its "<" escaped (see ESCAPE)
        escaped = f"{content} | replace('<', {text(ESCAPE)})"
        return f"{{{{ {text(bos)} + {role} + '\\n' + {escaped} + {text(eos + chr(10))} }}}}"

    return ("{%- if messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}"
            f"{{%- set system = {text(system_prompt or '')} -%}}{{%- set turns = messages -%}}"
            "{%- endif -%}"
            "{%- if system -%}" + block("'system'", "system") + "{%- endif -%}"
            "{%- for message in turns -%}"
            "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
            "{{ raise_exception('user and assistant must alternate, starting with user') }}{%- endif -%}"
            + block("message['role']", "message['content']") +
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {text(bos + 'assistant' + chr(10))} }}}}{{%- endif -%}}")

"""Figures for scripts/convert_model.py: ours vs transformers, the chat template, export/import at 104M.

    python bench/interchange.py                      # demo shape (random weights, or --checkpoint a demo model)
    python bench/interchange.py --big                # + the 104M shape: logits, wall time, file sizes
    python bench/interchange.py --checkpoint out/full_sft_128.pth

Prints one line per figure:
  - the max |logit difference| ours vs transformers' LlamaForCausalLM (float32) and greedy-decoding agreement;
  - how many demo SFT conversations the exported chat template renders to exactly render_chat's ids;
  - MiniMind2 layout: max |logit difference| of the imported model vs the adjacent-pair (complex) RoPE
    reference implementation of tests/test_convert.py, and the import's wall time;
  - at 104M (dim 768, 16 layers): export / import wall time (in-process, time.perf_counter) and file sizes.
"""
import glob
import importlib.util
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dataset.chat import render_chat  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from model.generate import generate  # noqa: E402
from model.tokenizer import DEFAULT_TOKENIZER, Tokenizer  # noqa: E402
from trainer.checkpoint import atomic_save, load_model, model_payload  # noqa: E402
from trainer.cli import ArgumentParser  # noqa: E402

DEMO_SHAPE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)     # demo.py's defaults
BIG_SHAPE = dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, max_seq_len=512)     # MiniMind2's 104M
MINIMIND2_SMALL = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, hidden=1408)    # MiniMind2-Small (26M)


def converter():
    spec = importlib.util.spec_from_file_location("convert_model", os.path.join(ROOT, "scripts", "convert_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_checkpoint(shape, path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=6400, **shape)).eval()
    atomic_save(model_payload(model, "full_sft", 0, tokenizer=Tokenizer()), path)
    return path


def timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def compare_logits(ckpt, export_dir, n_sequences, length, quiet=True):
    from transformers import AutoModelForCausalLM
    ours = load_model(ckpt)[0].eval()
    theirs = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    torch.manual_seed(1)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for _ in range(n_sequences):
            ids = torch.randint(0, ours.cfg.vocab_size, (1, length))
            logits = ours(ids)
            worst = max(worst, (logits - theirs(ids).logits).abs().max().item())
            scale = max(scale, logits.abs().max().item())
    return ours, theirs, f"{worst:.3g} (largest |logit| {scale:.3g})"


def demo_conversations(limit):
    conversations = []
    for path in sorted(glob.glob(os.path.join(ROOT, "dataset", "demo", "sft_*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            conversations += [json.loads(line)["conversations"] for line in f if line.strip()]
    return conversations[:limit]


def main():
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", default=None, help="a demo-shape checkpoint (default: random weights)")
    ap.add_argument("--big", action="store_true", help="also the 104M shape (about a minute, ~3 GB of memory)")
    ap.add_argument("--conversations", type=int, default=None,
                    help="how many demo SFT conversations test the template (default: all)")
    args = ap.parse_args()
    convert = converter()
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or random_checkpoint(DEMO_SHAPE, os.path.join(tmp, "demo.pth"))
        convert.export(ckpt, os.path.join(tmp, "demo_hf"), "float32")
        ours, theirs, worst = compare_logits(ckpt, os.path.join(tmp, "demo_hf"), 8, 256)
        print(f"demo shape ({'random weights' if not args.checkpoint else ckpt}): max |logit diff| ours vs "
              f"transformers over 8 x 256 tokens: {worst}")
        tokenizer = Tokenizer()
        same_greedy = 0
        prompts = ["water (noun):", "《静夜思》 唐·李白\n", "你好", "person (noun): a human being."]
        for prompt in prompts:
            ids = tokenizer.encode(prompt)
            mine = list(generate(ours, ids, max_new_tokens=32, temperature=0))
            hf = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
            same_greedy += mine == hf
        print(f"greedy 32 tokens, same ids: {same_greedy}/{len(prompts)} prompts")

        hf_tokenizer = AutoTokenizer.from_pretrained(os.path.join(tmp, "demo_hf"))
        conversations = demo_conversations(args.conversations)
        equal = {True: 0, False: 0}
        for messages in conversations:
            for add_generation_prompt in (True, False):
                turns = messages[:-1] if add_generation_prompt and messages[-1]["role"] == "assistant" else messages
                ours_ids, _ = render_chat(tokenizer, turns, add_generation_prompt=add_generation_prompt)
                theirs_ids = hf_tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt,
                                                              tokenize=True, return_dict=True)["input_ids"]
                equal[add_generation_prompt] += ours_ids == theirs_ids
        print(f"chat template == render_chat ids: {equal[True]}/{len(conversations)} demo SFT conversations with "
              f"add_generation_prompt, {equal[False]}/{len(conversations)} whole conversations")

        from tests.test_convert import minimind2_reference_logits, minimind2_state_dict
        state = minimind2_state_dict(**MINIMIND2_SMALL)
        torch.save(state, os.path.join(tmp, "full_sft_512.pth"))
        seconds = timed(convert.import_model, os.path.join(tmp, "full_sft_512.pth"), os.path.join(tmp, "mm.pth"),
                        DEFAULT_TOKENIZER)
        imported = load_model(os.path.join(tmp, "mm.pth"))[0].eval()
        ids = torch.randint(0, 6400, (2, 128))
        with torch.no_grad():
            diff = (imported(ids) - minimind2_reference_logits(state, ids, 8, 2)).abs().max().item()
        print(f"MiniMind2 layout (dim 512, 8 layers, random weights): import {seconds:.2f} s, max |logit diff| vs "
              f"the complex-RoPE reference over 2 x 128 tokens: {diff:.3g}")

        if args.big:
            big = random_checkpoint(BIG_SHAPE, os.path.join(tmp, "big.pth"))
            for dtype in ("float32", "bfloat16"):
                out = os.path.join(tmp, f"big_{dtype}")
                seconds = timed(convert.export, big, out, dtype)
                size = os.path.getsize(os.path.join(out, "model.safetensors"))
                print(f"104M export {dtype}: {seconds:.2f} s, model.safetensors {size / 1e6:.1f} MB "
                      f"(checkpoint {os.path.getsize(big) / 1e6:.1f} MB)")
            seconds = timed(convert.import_model, os.path.join(tmp, "big_float32"), os.path.join(tmp, "big_back.pth"))
            back_path = os.path.join(tmp, "big_back.pth")
            a, b = torch.load(big, weights_only=False), torch.load(back_path, weights_only=False)
            identical = a["config"] == b["config"] and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
            print(f"104M import float32: {seconds:.2f} s, {os.path.getsize(back_path) / 1e6:.1f} MB; round trip "
                  f"bit-identical: {identical}")
            _, _, worst = compare_logits(big, os.path.join(tmp, "big_float32"), 2, 256)
            print(f"104M (random weights): max |logit diff| ours vs transformers over 2 x 256 tokens: {worst}")


if __name__ == "__main__":
    main()

"""Talk to a trained model. Answers stream through the KV cache as they are generated.

    python eval_model.py                          # the SFT model in out/ (chat)
    python eval_model.py --model_mode 2           # the DPO model; 0 = the pretrained model (continues text)
    python eval_model.py --checkpoint out/full_sft_768.pth
    python eval_model.py --auto                   # a built-in list of zh + en prompts, then exit
    echo 你好 | python eval_model.py              # one prompt per line from a pipe

The model config is read from the checkpoint (--dim/--n_layers are only checked against it).
"""
import argparse
import glob
import os
import sys
import time

import torch

from dataset.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from model.generate import generate
from model.tokenizer import BOS_ID, DEFAULT_TOKENIZER, EOS_ID, Tokenizer
from trainer.checkpoint import load_model

MODES = {0: ("pretrain", "python train_pretrain.py"),
         1: ("full_sft", "python train_full_sft.py"),
         2: ("rlhf", "python train_dpo.py")}

AUTO_PROMPTS = {
    "text": ["「学习」读作", "《静夜思》 唐·李白\n", "water (noun):", "person (noun): a human being."],
    "chat": ["你是谁？", "What is your name?", "「学习」是什么意思？", 'What does "water" mean?',
           "请背诵李白的《静夜思》。", "「床前明月光」的下一句是什么？", 'How do you say "book" in Chinese?',
           "Define the word \"happy\"."],
}


def find_checkpoint(args):
    """The checkpoint to load: --checkpoint, or {out_dir}/{stage}_{dim}.pth for --model_mode."""
    if args.checkpoint:
        return args.checkpoint
    stage, command = MODES[args.model_mode]
    if args.dim is not None:
        path = os.path.join(args.out_dir, f"{stage}_{args.dim}.pth")
        candidates = [path] if os.path.exists(path) else []
    else:
        candidates = sorted(p for p in glob.glob(os.path.join(args.out_dir, f"{stage}_*.pth"))
                            if not p.endswith("_resume.pth"))
        path = os.path.join(args.out_dir, f"{stage}_<dim>.pth")
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        sys.exit(f"several {stage} checkpoints in {args.out_dir}: {candidates}; choose one with --dim")
    sys.exit(f"no checkpoint {path}. It is written by the {stage} stage: run `{command}"
             f"{' --dim ' + str(args.dim) if args.dim else ''} --out_dir {args.out_dir}` (or `make demo`), "
             f"or pass --checkpoint PATH.")


class StreamPrinter:
    """Print tokens as they come. A Chinese character is 3 bytes and may span tokens, so text is printed
    only up to the last complete character (decoding a partial one gives U+FFFD)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def add(self, tok):
        if tok == EOS_ID:
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def text(self):
        return self.tokenizer.decode(self.ids)


def prompts(args, chat):
    if args.auto:
        yield from AUTO_PROMPTS["chat" if chat else "text"]
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("\n> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        line = line.rstrip("\n")
        if line.strip():
            yield line


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_mode", type=int, default=1, choices=sorted(MODES),
                    help="0: pretrain (continue text), 1: full_sft, 2: rlhf (DPO)")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint path (overrides --model_mode)")
    ap.add_argument("--out_dir", default="out")
    ap.add_argument("--dim", type=int, default=None, help="checked against the checkpoint")
    ap.add_argument("--n_layers", type=int, default=None, help="checked against the checkpoint")
    ap.add_argument("--tokenizer_path", default=DEFAULT_TOKENIZER)
    ap.add_argument("--device", default=None)
    ap.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT)
    ap.add_argument("--history_cnt", type=int, default=0, help="earlier exchanges (user + answer) kept as context")
    ap.add_argument("--max_new_tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.85, help="0: greedy")
    ap.add_argument("--top_p", type=float, default=0.85)
    ap.add_argument("--top_k", type=int, default=0, help="0: off")
    ap.add_argument("--repetition_penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None, help="fix sampling for reproducible answers")
    ap.add_argument("--auto", action="store_true", help="answer a built-in list of prompts and exit")
    args = ap.parse_args()

    path = find_checkpoint(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, ckpt = load_model(path, {"dim": args.dim, "n_layers": args.n_layers})
    model.to(device).eval()
    tokenizer = Tokenizer(args.tokenizer_path)
    # Mode 0 (or a pretraining checkpoint) continues raw text: a pretrained model has never seen the template.
    chat = ckpt.get("stage") != "pretrain" if args.checkpoint else args.model_mode != 0
    print(f"{path}: {model.num_parameters() / 1e6:.2f}M parameters, stage {ckpt.get('stage')}, step "
          f"{ckpt.get('step')}; {'chat' if chat else 'text continuation'} on {device}", flush=True)
    generator = torch.Generator(device=device)
    if args.seed is not None:
        generator.manual_seed(args.seed)

    history = []
    for prompt in prompts(args, chat):
        if chat:
            messages = history[-2 * args.history_cnt:] if args.history_cnt else []
            messages = messages + [{"role": "user", "content": prompt}]
            ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True,
                                 system_prompt=args.system_prompt or None)
        else:
            ids = [BOS_ID] + tokenizer.encode(prompt)
        if not sys.stdin.isatty() or args.auto:
            print(f"\n> {prompt}")
        printer = StreamPrinter(tokenizer, sys.stdout)
        t0, n = time.perf_counter(), 0
        for tok in generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.repetition_penalty, generator=generator):
            printer.add(tok)
            n += 1
        seconds = time.perf_counter() - t0
        print(f"\n[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]", flush=True)
        if chat and printer.text().strip():  # an empty answer would break the chat template's rules
            history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": printer.text()}]


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # e.g. `python eval_model.py --auto | head`: the reader left, stop quietly
        sys.stderr.close()

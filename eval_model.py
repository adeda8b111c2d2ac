"""Talk to a trained model. Answers stream through the KV cache as they are generated.

    python eval_model.py                          # the SFT model in out/ (chat)
    python eval_model.py --model_mode 2           # the DPO model; 0 = the pretrained model (continues text)
    python eval_model.py --checkpoint out/full_sft_768.pth --history_cnt 4   # remembers the last 2 exchanges
    python eval_model.py --auto                   # a built-in list of zh + en prompts, then exit
    echo 你好 | python eval_model.py > answers.txt   # one prompt per line; stdout gets only the answers

In a terminal: arrow keys edit the line and recall earlier ones; /clear forgets the conversation, /help lists
the commands, /exit or Ctrl-D quits. Ctrl-C stops an answer while it streams (that exchange is left out of
the conversation) and clears the line at the prompt. Status lines (the model, tokens/s, notes) go to stderr.

The model config is read from the checkpoint (--dim/--n_layers are only checked against it). Sampling is
random; the seed of each run is printed, and --seed N repeats a run exactly.
"""
import sys
import time

import torch

from dataset.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from model.engine import Engine, Request
from model.tokenizer import EOS_ID
from trainer.chat_model import add_model_args, load_chat_model, text_prompt
from trainer.cli import (ArgumentParser, non_negative_float, non_negative_int, positive_float, positive_int,
                         probability_mass, run_main)

AUTO_PROMPTS = {
    "text": ["「学习」读作", "《静夜思》 唐·李白\n", "water (noun):", "person (noun): a human being."],
    "chat": ["你是谁？", "What is your name?", "「学习」是什么意思？", 'What does "water" mean?',
           "请背诵李白的《静夜思》。", "「床前明月光」的下一句是什么？", 'How do you say "book" in Chinese?',
           "Define the word \"happy\"."],
}

COMMANDS = {"/clear": "forget the conversation so far", "/help": "list these commands",
            "/exit": "quit (Ctrl-D does too)"}
HELP = "\n".join([f"  {name:<7} {what}" for name, what in COMMANDS.items()] +
                 ["Any other line is sent to the model. Ctrl-C stops an answer; at the prompt it clears the line."])


def note(text):
    """A status line. It goes to stderr, so that stdout holds only the answers (`... > answers.txt`)."""
    print(text, file=sys.stderr, flush=True)


def parse_args():
    ap = ArgumentParser(description=__doc__)
    add_model_args(ap)  # --model_mode, --checkpoint, --out_dir, --dim, --n_layers, --tokenizer_path, --device, --lora_name
    ap.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT, help="'' for no system message")
    ap.add_argument("--history_cnt", type=non_negative_int, default=0,
                    help="earlier MESSAGES kept as context, counted as in MiniMind2: 2 = the last question and "
                         "its answer, 4 = the last two exchanges; an odd number is rounded down; 0 (the default): "
                         "every prompt starts a new conversation")
    ap.add_argument("--max_seq_len", type=positive_int, default=None,
                    help="context in tokens for history + prompt + answer (default: the checkpoint's "
                         "max_seq_len); when it is full, the oldest exchanges are dropped. In MiniMind2 it also "
                         "capped the answer: here that is --max_new_tokens")
    ap.add_argument("--max_new_tokens", type=positive_int, default=512,
                    help="longest answer in tokens; up to half the context is kept free for it, the prompt and "
                         "history get the rest, and an answer also ends where the context does")
    ap.add_argument("--temperature", type=non_negative_float, default=0.85, help="0: greedy")
    ap.add_argument("--top_p", type=probability_mass, default=0.85,
                    help="nucleus sampling: keep the likeliest tokens up to this probability mass; 1: off")
    ap.add_argument("--top_k", type=non_negative_int, default=0, help="keep the k likeliest tokens; 0 (the default): off")
    ap.add_argument("--repetition_penalty", type=positive_float, default=1.0,
                    help="> 1 makes tokens already in the text less likely; 1: off")
    ap.add_argument("--seed", type=int, default=None,
                    help="repeat a run's sampling exactly (default: a new seed every run, printed at the start)")
    ap.add_argument("--auto", action="store_true", help="answer a built-in list of prompts and exit")
    return ap.parse_args()


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


def read_lines(args, chat, interactive):
    """The user's lines: the built-in prompts (--auto), a terminal (with line editing), or a pipe."""
    if args.auto:
        yield from AUTO_PROMPTS["chat" if chat else "text"]
        return
    while True:
        if interactive:
            try:
                line = input("> ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as in a shell
                print()
                continue
            except EOFError:           # Ctrl-D: end the last line, so the shell's prompt starts on its own
                print()
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            line = line.rstrip("\r\n")  # "\r\n" too: a file written on Windows must not send "你好\r"
        if line.strip():
            yield line


def build_prompt(tokenizer, history, prompt, chat, system_prompt, limit):
    """The token ids to generate from, and the part of `history` they include: the oldest exchanges are dropped
    until the ids fit in `limit` tokens. The ids are longer than `limit` only when the new prompt alone is (the
    caller refuses it). Text continuation (a pretrained model) has no history and no chat template."""
    if not chat:
        return text_prompt(tokenizer, prompt), history
    while True:
        messages = history + [{"role": "user", "content": prompt}]
        ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True, system_prompt=system_prompt or None)
        if len(ids) <= limit or not history:
            return ids, history
        history = history[2:]  # drop the oldest exchange: a question and its answer


def main():
    args = parse_args()
    loaded = load_chat_model(args)
    model, path, ckpt, tokenizer, chat, device = (loaded.model, loaded.path, loaded.ckpt, loaded.tokenizer,
                                                  loaded.chat, loaded.device)
    cfg = model.cfg
    if loaded.lora:
        note(f"+ LoRA adapters {loaded.lora_path} (rank {loaded.lora['rank']}, trained on {loaded.lora['base']})")
    context = args.max_seq_len or cfg.max_seq_len
    # The batched engine (model/engine.py) with one row: the terminal has one conversation at a time. No
    # tokenizer: StreamPrinter turns the tokens into text here (and there are no stop strings).
    engine = Engine(model, None, max_batch_size=1, max_len=context)
    # Without --seed, a fresh seed from the OS every run (torch's default seed would give the same "random"
    # answers each time); it is printed, so a run worth keeping can be repeated with --seed.
    generator = torch.Generator(device=device)
    seed = generator.manual_seed(args.seed).initial_seed() if args.seed is not None else generator.seed()
    note(f"{path}: {model.num_parameters() / 1e6:.2f}M parameters, stage {ckpt.get('stage')}, step "
         f"{ckpt.get('step')}; {'chat' if chat else 'text continuation'} on {device}, context {context} tokens, "
         f"seed {seed}")
    if context > cfg.max_seq_len:
        note(f"note: the model was trained on {cfg.max_seq_len} tokens; past that its answers may fall apart")
    # MiniMind2 counts messages (user and assistant); an odd count would start the history with an answer.
    keep = args.history_cnt - args.history_cnt % 2
    if keep != args.history_cnt:
        note(f"note: --history_cnt counts messages (2 = one exchange); using {keep}")
    # Room kept free for the answer: --max_new_tokens, but at most half the context, so that a long
    # --max_new_tokens does not crowd out the conversation. The prompt gets the rest.
    prompt_limit = context - min(args.max_new_tokens, context // 2)

    interactive = sys.stdin.isatty() and not args.auto
    if interactive:
        import readline  # noqa: F401 - imported for its side effect: input() gets line editing and history
        note("Type /help for the commands; Ctrl-D exits.")
    history = []  # the conversation the model sees: user and assistant messages, oldest first
    for line in read_lines(args, chat, interactive):
        if not interactive:  # show which prompt each answer belongs to (a terminal already shows the typing)
            note(f"> {line}")
        command = line.strip()
        if command == "/exit":
            break
        if command == "/clear":
            history = []
            note("[conversation cleared]")
            continue
        if command == "/help":
            note(HELP)
            continue

        ids, kept = build_prompt(tokenizer, history, line, chat, args.system_prompt, prompt_limit)
        if len(ids) > prompt_limit:
            note(f"[prompt refused: it is {len(ids)} tokens{' with the chat template' if chat else ''}; the "
                 f"context is {context} tokens, {context - prompt_limit} of them kept for the answer. Shorten it, "
                 f"or lower --max_new_tokens]")
            continue
        if len(kept) < len(history):
            note(f"[dropped the oldest {(len(history) - len(kept)) // 2} exchange(s) to fit the context of "
                 f"{context} tokens]")
            history = kept

        printer = StreamPrinter(tokenizer, sys.stdout)
        t0, n = time.perf_counter(), 0
        try:
            # The engine ends the answer where the context does (at most context - len(ids) tokens).
            request = Request(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              args.repetition_penalty, generator=generator)
            for tok in engine.stream(request):
                printer.add(tok)
                n += 1
        except KeyboardInterrupt:
            if not interactive:  # from a pipe or --auto, Ctrl-C stops the program (run_main: exit 130)
                raise
            # The unfinished answer stays on the screen but not in the conversation: it never got its </s>,
            # and the question alone would leave two user turns in a row.
            print(flush=True)
            note("[stopped; this exchange is left out of the conversation]")
            continue
        print(flush=True)  # ends the answer's last line: one answer per prompt on stdout
        seconds = time.perf_counter() - t0
        note(f"[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]")
        if chat and keep and printer.text().strip():  # an empty answer would break the chat template's rules
            history = (history + [{"role": "user", "content": line},
                                  {"role": "assistant", "content": printer.text()}])[-keep:]


if __name__ == "__main__":
    try:
        run_main(main)
    except BrokenPipeError:  # e.g. `python eval_model.py --auto | head`: the reader left, stop quietly
        sys.stderr.close()

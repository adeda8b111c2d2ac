"""Train the byte-level BPE tokenizer (vocab 6400, MiniMind2's special ids) on JSONL text.

    python train_tokenizer.py                                   # the bundled demo corpus -> out/tokenizer.json
    python train_tokenizer.py --data_path pretrain_hq.jsonl,sft_512.jsonl --vocab_size 6400
    python train_tokenizer.py --out model/tokenizer/tokenizer.json   # rebuild the shipped one

A new tokenizer gives the same text other token ids: a checkpoint works only with the tokenizer it was
trained with. So the shipped model/tokenizer/tokenizer.json is replaced only when --out names it, and an
existing file is overwritten only when --out is given.

Reads `{"text": ...}` lines (pretraining) and the message contents of `{"conversations"|"messages": [...]}`
lines (SFT), streaming them one line at a time, so a multi-GB file never sits in memory.
Byte-level means every UTF-8 byte is in the base alphabet: any string (Chinese, English, emoji, tabs) encodes
with no <unk> and decodes back exactly.
"""
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from dataset.jsonl import DataError, expand_paths, iter_jsonl
from model.tokenizer import SPECIAL_TOKENS
from trainer.cli import ArgumentParser, UserError, run_main

DEMO_TEXT = "dataset/demo/pretrain_*.jsonl,dataset/demo/sft_*.jsonl"
DEFAULT_OUT = "out/tokenizer.json"


def texts_of(paths):
    """Yield the trainable text of every line: a pretraining document or each message of a conversation."""
    for where, obj in iter_jsonl(paths):
        if "text" in obj:
            if not isinstance(obj["text"], str):
                raise DataError(f"{where}: field 'text' must be a string")
            yield obj["text"]
        elif "conversations" in obj or "messages" in obj:
            for msg in obj.get("conversations", obj.get("messages")):
                if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                    raise DataError(f"{where}: every message needs a string 'content'")
                yield msg["content"]
        else:
            raise DataError(f"{where}: expected a 'text', 'conversations' or 'messages' field")


def main():
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--data_path", default=DEMO_TEXT, help="JSONL files: comma-separated, globs allowed")
    ap.add_argument("--vocab_size", type=int, default=6400)
    ap.add_argument("--out", default=None, help=f"where tokenizer.json is written (default: {DEFAULT_OUT}, "
                    "which is never overwritten unless named here)")
    args = ap.parse_args()
    out = args.out or DEFAULT_OUT
    if args.out is None and os.path.exists(out):  # checked before the minutes of training, not after
        raise UserError(f"{out} exists: pass --out PATH to overwrite it or to write elsewhere")

    paths = expand_paths(args.data_path)
    tokenizer = Tokenizer(models.BPE())
    # ByteLevel: map bytes to printable characters and split words GPT-2 style; no prefix space is added, so
    # "你好" and " hello" encode exactly as written and decoding gives back the same bytes.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,                          # first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),   # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    texts = tqdm(texts_of(paths), desc="reading", unit=" texts")
    tokenizer.train_from_iterator(texts, trainer=trainer)

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tokenizer.save(out)
    print(f"vocab {tokenizer.get_vocab_size()} from {len(paths)} files -> {out} "
          f"(train with it: --tokenizer_path {out})")


if __name__ == "__main__":
    run_main(main)

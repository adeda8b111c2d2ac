"""Train the byte-level BPE tokenizer (vocab 6400, MiniMind2's special ids) on JSONL text.

    python train_tokenizer.py                                   # the bundled demo corpus
    python train_tokenizer.py --data_path pretrain_hq.jsonl,sft_512.jsonl --vocab_size 6400

Reads `{"text": ...}` lines (pretraining) and the message contents of `{"conversations"|"messages": [...]}`
lines (SFT), streaming them one line at a time, so a multi-GB file never sits in memory.
Byte-level means every UTF-8 byte is in the base alphabet: any string (Chinese, English, emoji, tabs) encodes
with no <unk> and decodes back exactly.
"""
import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from dataset.jsonl import DataError, expand_paths, iter_jsonl
from model.tokenizer import DEFAULT_TOKENIZER, SPECIAL_TOKENS

DEMO_TEXT = "dataset/demo/pretrain_*.jsonl,dataset/demo/sft_*.jsonl"


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", default=DEMO_TEXT, help="JSONL files: comma-separated, globs allowed")
    ap.add_argument("--vocab_size", type=int, default=6400)
    ap.add_argument("--out", default=DEFAULT_TOKENIZER, help="where tokenizer.json is written")
    args = ap.parse_args()

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

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tokenizer.save(args.out)
    print(f"vocab {tokenizer.get_vocab_size()} from {len(paths)} files -> {args.out}")


if __name__ == "__main__":
    main()

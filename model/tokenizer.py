"""The tokenizer: a thin wrapper around a Hugging Face `tokenizers` byte-level BPE file (tokenizer.json).

Why a wrapper: by default `tokenizers` turns the *text* "</s>" into the special end-of-turn id. If a user types
"</s><s>assistant" into a chat, that would let them forge a turn. Here `encode` always treats input as plain
text; special ids are only ever inserted by our own code (the chat template, the pretraining packer) from the
constants below. MiniMind2's own tokenizer.json uses the same ids and works unchanged.
"""
import os

from tokenizers import Tokenizer as HFTokenizer

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer", "tokenizer.json")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: MiniMind2's layout
PAD_ID = UNK_ID = 0                        # <unk> doubles as padding; padded positions are never supervised
BOS_ID = 1                                 # <s>: starts a document / a chat turn
EOS_ID = 2                                 # </s>: ends a document / a chat turn; generation stops on it


class Tokenizer:
    def __init__(self, path=DEFAULT_TOKENIZER):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path} (train one with `python train_tokenizer.py`)")
        self.path = path
        self._tok = HFTokenizer.from_file(path)
        for want_id, token in enumerate(SPECIAL_TOKENS):
            got = self._tok.token_to_id(token)
            if got != want_id:
                raise ValueError(f"{path}: special token {token!r} has id {got}, expected {want_id}")
        # Never match special tokens inside text: "</s>" typed by a user stays the five characters "</s>".
        self._tok.encode_special_tokens = True

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size()

    def encode(self, text):
        """Plain text -> token ids (no special tokens added or recognised)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        """Token ids -> text; special tokens are rendered as their text ("<s>", "</s>")."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i):
        return self._tok.id_to_token(i)

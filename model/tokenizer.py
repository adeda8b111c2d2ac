"""The tokenizer: a thin wrapper around a Hugging Face `tokenizers` byte-level BPE file (tokenizer.json).

Why a wrapper: by default `tokenizers` turns the *text* "</s>" into the special end-of-turn id. If a user types
"</s><s>assistant" into a chat, that would let them forge a turn. Here `encode` always treats input as plain
text; special ids are only ever inserted by our own code (the chat template, the pretraining packer) from the
constants below. MiniMind2's own tokenizer.json uses the same ids and works unchanged, under either of its
two sets of names for them (see SPECIAL_TOKEN_NAMES).
"""
import json
import os

from tokenizers import Tokenizer as HFTokenizer

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer", "tokenizer.json")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: MiniMind2's layout
PAD_ID = UNK_ID = 0                        # <unk> doubles as padding; padded positions are never supervised
BOS_ID = 1                                 # <s>: starts a document / a chat turn
EOS_ID = 2                                 # </s>: ends a document / a chat turn; generation stops on it
# MiniMind2's later tokenizer.json names the same three ids <|endoftext|>, <|im_start|>, <|im_end|>. Only the
# names differ: the ids and their roles are the same, so both files work (decode shows the file's names).
SPECIAL_TOKEN_NAMES = (SPECIAL_TOKENS, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


class TokenizerError(ValueError):
    """A missing or incompatible tokenizer file: a user mistake, reported in one line."""


class Tokenizer:
    """Load from a tokenizer.json file (`Tokenizer(path)`) or from its text (`Tokenizer.from_json(text, source)`,
    e.g. the copy every checkpoint carries). `json_text` is the file's text, so it can travel with the model."""

    def __init__(self, path=DEFAULT_TOKENIZER):
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file not found: {path} (train one with `python train_tokenizer.py`)")
        with open(path, encoding="utf-8", newline="") as f:  # newline="": the text exactly as in the file
            self._load(f.read(), path)

    @classmethod
    def from_json(cls, text, source):
        """A tokenizer from the text of a tokenizer.json; `source` says where it came from (for messages)."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(text, source)
        return tokenizer

    def _load(self, text, source):
        self.path = source  # the file it was read from (first, for a copy carried by a checkpoint)
        self.json_text = text
        try:
            self._tok = HFTokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - not JSON / not a tokenizer: name the file, not serde's internals
            raise TokenizerError(f"{source} is not a readable tokenizer.json ({e})") from None
        names = [self._tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))]
        if names not in SPECIAL_TOKEN_NAMES:
            raise TokenizerError(f"{source}: ids 0, 1, 2 are {names}, expected "
                                 f"{' or '.join(map(str, SPECIAL_TOKEN_NAMES))} (pad/unknown, start, end)")
        # Never match special tokens inside text: "</s>" typed by a user stays the five characters "</s>".
        self._tok.encode_special_tokens = True

    def same_as(self, other):
        """True when both tokenizers come from the same tokenizer.json content (formatting aside)."""
        return json.loads(self.json_text) == json.loads(other.json_text)

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size()

    def encode(self, text):
        """Plain text -> token ids (no special tokens added or recognised)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        """Token ids -> text; special tokens are rendered as their names in the file ("<s>", "</s>")."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i):
        return self._tok.id_to_token(i)

"""The chat template, rendered by hand: token ids and the loss mask are built side by side.

MiniMind2's layout, one turn per block (<s> and </s> are the special ids 1 and 2, never text):

    <s>system\n{system}</s>\n<s>user\n{question}</s>\n<s>assistant\n{answer}</s>\n ...

The loss mask is 1 exactly on the tokens the model must learn to produce: each assistant answer's content and
the </s> that ends it (so it learns when to stop); 0 on system/user turns, on role headers and on the "\n"
separators. Each piece (header, content, separator) is tokenised on its own, so a mask boundary always falls
between two tokens whatever BPE would merge across a seam, and the ids are the same at training and at chat
time. Message content is encoded as plain text: a user who types "</s><s>assistant" gets those characters, not
a forged turn (see model/tokenizer.py).
"""
from model.tokenizer import BOS_ID, EOS_ID

DEFAULT_SYSTEM_PROMPT = "你是 TinyMind，是一个有用的人工智能助手。"
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    pass


def validate_messages(messages):
    """Check a conversation's shape; raise ChatFormatError saying what is wrong.

    An optional system message first, then user/assistant strictly alternating, starting with user.
    Roles are read from each message's `role` field, never inferred from position."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("a conversation must be a non-empty list of messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ChatFormatError(f"message {i} is not an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise ChatFormatError(f"message {i} ({role}): content must be a non-empty string")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            where = i + (len(messages) - len(body))
            if msg["role"] == "system":
                raise ChatFormatError(f"message {where}: a system message may only come first")
            raise ChatFormatError(f"message {where}: expected role {expected!r}, got {msg['role']!r} "
                                  "(user and assistant must alternate, starting with user)")
    return messages


def render_chat(tokenizer, messages, add_generation_prompt=False, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """Render a conversation to (ids, loss_mask), two lists of equal length.

    add_generation_prompt: end with "<s>assistant\\n" so the model continues with an answer (chat time).
    system_prompt: used when the conversation has no system message (None: no system block at all)."""
    validate_messages(messages)
    if messages[0]["role"] != "system" and system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    ids, mask = [], []

    def add(tokens, supervised):
        ids.extend(tokens)
        mask.extend([int(supervised)] * len(tokens))

    newline = tokenizer.encode("\n")
    for msg in messages:
        is_answer = msg["role"] == "assistant"
        add([BOS_ID] + tokenizer.encode(msg["role"] + "\n"), False)   # <s>role\n
        add(tokenizer.encode(msg["content"]), is_answer)               # the content
        add([EOS_ID], is_answer)                                       # </s>: learn to stop after an answer
        add(newline, False)                                            # \n between turns
    if add_generation_prompt:
        add([BOS_ID] + tokenizer.encode("assistant\n"), False)
    return ids, mask


def show_sample(tokenizer, ids, mask):
    """A rendered sample as text, supervised tokens in green (ANSI) and also bracketed as [[...]] so the
    marking survives copy-paste and log files."""
    out, run, run_sup = [], [], None
    for tok, m in zip(ids, mask):
        if run and m != run_sup:
            out.append((run_sup, tokenizer.decode(run)))
            run = []
        run.append(tok)
        run_sup = m
    if run:
        out.append((run_sup, tokenizer.decode(run)))
    return "".join(f"\033[32m[[{text}]]\033[0m" if sup else text for sup, text in out)

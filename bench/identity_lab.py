"""The identity lab: did DPO flip the model's name, and how far did it move on everything else?

    python bench/identity_lab.py --sft out/full_sft_256.pth --dpo out/rlhf_256.pth

1. Flip rate: the share of held-out identity questions (eval_identity.jsonl, phrased unlike any training
   question) whose greedy answer contains "Deep TinyMind", before (SFT model) and after (DPO model).
2. Drift on held-out NON-identity prompts (dictionary and poetry eval files): on the reference answers'
   tokens, the mean change of per-token log-probability (DPO - SFT) and the mean per-token
   KL(DPO || SFT) = sum_v p_dpo(v) (log p_dpo(v) - log p_sft(v)). Small numbers = the rest of the model kept.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.chat import DEFAULT_SYSTEM_PROMPT, render_chat  # noqa: E402
from dataset.jsonl import expand_paths, iter_jsonl  # noqa: E402
from model.generate import generate  # noqa: E402
from model.tokenizer import DEFAULT_TOKENIZER, EOS_ID, Tokenizer  # noqa: E402
from trainer.checkpoint import load_model  # noqa: E402

NEW_NAME = "Deep TinyMind"


def conversations(paths, limit=None):
    out = []
    for _, obj in iter_jsonl(expand_paths(paths)):
        out.append(obj.get("conversations") or obj.get("messages"))
        if limit and len(out) >= limit:
            break
    return out


def greedy_answer(model, tokenizer, question, max_new_tokens=64, system_prompt=DEFAULT_SYSTEM_PROMPT):
    ids, _ = render_chat(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True,
                         system_prompt=system_prompt)
    new = [t for t in generate(model, ids, max_new_tokens, temperature=0) if t != EOS_ID]
    return tokenizer.decode(new)


def flip_rate(model, tokenizer, questions, max_new_tokens=64):
    answers = [greedy_answer(model, tokenizer, q, max_new_tokens) for q in questions]
    return sum(NEW_NAME in a for a in answers) / len(answers), answers


@torch.no_grad()
def drift(policy, reference, tokenizer, convs, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """Mean per-token log-prob change and KL(policy || reference) over the answers of `convs`."""
    d_logp, kl, n = 0.0, 0.0, 0
    for msgs in convs:
        ids, mask = render_chat(tokenizer, msgs, system_prompt=system_prompt)
        x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
        m = torch.tensor(mask[1:], dtype=torch.bool)
        lp = torch.log_softmax(policy(x)[0].float(), -1)[m]
        lr = torch.log_softmax(reference(x)[0].float(), -1)[m]
        t = y[m]
        d_logp += (lp.gather(-1, t[:, None]) - lr.gather(-1, t[:, None])).sum().item()
        kl += (lp.exp() * (lp - lr)).sum().item()
        n += int(m.sum())
    return {"delta_logp_per_token": d_logp / n, "kl_per_token": kl / n, "tokens": n}


def identity_report(sft_path, dpo_path, identity_path, heldout_path, max_new_tokens=64, heldout_limit=200,
                    tokenizer_path=DEFAULT_TOKENIZER):
    tokenizer = Tokenizer(tokenizer_path)
    sft = load_model(sft_path)[0].eval()
    dpo = load_model(dpo_path)[0].eval()
    questions = [c[0]["content"] for c in conversations(identity_path)]
    before, sft_answers = flip_rate(sft, tokenizer, questions, max_new_tokens)
    after, dpo_answers = flip_rate(dpo, tokenizer, questions, max_new_tokens)
    return {"questions": questions, "flip_rate_before": before, "flip_rate_after": after,
            "answers_before": sft_answers, "answers_after": dpo_answers,
            "heldout": drift(dpo, sft, tokenizer, conversations(heldout_path, heldout_limit))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="the model before DPO (e.g. out/full_sft_256.pth)")
    ap.add_argument("--dpo", required=True, help="the model after DPO (e.g. out/rlhf_256.pth)")
    ap.add_argument("--identity_path", default="dataset/demo/eval_identity.jsonl")
    ap.add_argument("--heldout_path", default="dataset/demo/eval_wordnet.jsonl,dataset/demo/eval_cedict.jsonl,"
                                              "dataset/demo/eval_poetry.jsonl")
    ap.add_argument("--heldout_limit", type=int, default=200, help="held-out conversations scored for drift")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--json", default=None, help="also write the full report here")
    args = ap.parse_args()
    r = identity_report(args.sft, args.dpo, args.identity_path, args.heldout_path, args.max_new_tokens,
                        args.heldout_limit)
    print(f'identity flip rate ("{NEW_NAME}" in the greedy answer, {len(r["questions"])} held-out questions): '
          f'{r["flip_rate_before"]:.0%} before -> {r["flip_rate_after"]:.0%} after DPO')
    h = r["heldout"]
    print(f'held-out non-identity answers ({h["tokens"]} tokens): mean log-prob change {h["delta_logp_per_token"]:+.4f}'
          f' per token, KL(DPO || SFT) {h["kl_per_token"]:.4f} per token')
    for q, a, b in zip(r["questions"], r["answers_before"], r["answers_after"]):
        print(f"- {q}\n    SFT: {a}\n    DPO: {b}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(r, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()

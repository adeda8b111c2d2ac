"""Score conversations with a reward model (train_reward.py): one number per conversation's last answer.

    python bench/score_reward.py --model out/reward_64.pth --data_path answers.jsonl
    python bench/score_reward.py --model out/reward_64.pth --data_path answers.jsonl --out scored.jsonl

Input: JSONL of {"conversations": [...]} (or {"messages": [...]}) ending with an assistant answer, as SFT
data. Each is rendered with the chat template up to the </s> that closes the last answer and scored there,
the way the reward model was trained (with the system prompt it was trained with, unless --system_prompt).
Prints file:line and the score of each conversation (or writes the records with a "reward" field to --out),
then the mean, std, min and max.
"""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.jsonl import DataError, iter_jsonl  # noqa: E402
from dataset.reward import answer_sequence, pad_rows  # noqa: E402
from dataset.sft import conversation_of  # noqa: E402
from model.heads import rewards_at  # noqa: E402
from trainer.checkpoint import checkpoint_tokenizer, load_reward_model  # noqa: E402
from trainer.cli import ArgumentParser, UserError, positive_int, run_main  # noqa: E402


@torch.no_grad()
def score_sequences(model, sequences, batch_size, device):
    """Rewards (a list of floats) of token sequences that each end with the answer's </s>."""
    scores = []
    for start in range(0, len(sequences), batch_size):
        input_ids, last_index = pad_rows(sequences[start:start + batch_size])
        rewards = rewards_at(model(input_ids.to(device)), last_index.to(device))
        scores += rewards.float().cpu().tolist()
    return scores


def main():
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="a reward model checkpoint (e.g. out/reward_64.pth)")
    ap.add_argument("--data_path", required=True, help="JSONL conversations (comma-separated, globs allowed)")
    ap.add_argument("--out", default=None, help="write each record with its 'reward' here (JSONL)")
    ap.add_argument("--system_prompt", default=None,
                    help="system prompt for conversations without one (default: the one the model was trained "
                         "with; '' for none)")
    ap.add_argument("--tokenizer_path", default=None,
                    help="tokenizer.json (default: the checkpoint's; older checkpoints: model/tokenizer/)")
    ap.add_argument("--batch_size", type=positive_int, default=16, help="conversations per forward pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    model, _, ckpt = load_reward_model(args.model)
    model = model.to(args.device).eval()
    system_prompt = args.system_prompt if args.system_prompt is not None else ckpt["reward"]["system_prompt"]
    tokenizer = checkpoint_tokenizer(ckpt, args.model, args.tokenizer_path)
    where, records, sequences = [], [], []
    for place, obj in iter_jsonl(args.data_path):
        try:
            messages = conversation_of(obj)
        except DataError as e:
            raise DataError(f"{place}: {e}") from None
        where.append(place)
        records.append(obj)
        sequences.append(answer_sequence(tokenizer, messages, system_prompt or None))
    if not sequences:
        raise UserError(f"--data_path {args.data_path}: no conversations to score")
    scores = score_sequences(model, sequences, args.batch_size, args.device)

    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for obj, score in zip(records, scores):
                f.write(json.dumps({**obj, "reward": score}, ensure_ascii=False) + "\n")
    else:
        for place, score in zip(where, scores):
            print(f"{place}\t{score:.6f}")
    spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
    print(f"{len(scores)} conversations: reward mean {statistics.fmean(scores):.4f}, std {spread:.4f}, "
          f"min {min(scores):.4f}, max {max(scores):.4f}" + (f" -> {args.out}" if args.out else ""))


if __name__ == "__main__":
    run_main(main)

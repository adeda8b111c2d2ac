"""Wall time of one PPO and one GRPO iteration at a given model size, without a trained model.

    python bench/rl_step_time.py --dim 128 --n_layers 4 --max_seq_len 256       # the demo model's shape

Writes a randomly initialised model of that shape as the "SFT" model and a random reward model next to it
(in a temporary directory), runs train_ppo.py and train_grpo.py for --iterations each with the reward model,
and prints the mean seconds per iteration from their logs (the first iteration left out: it warms up). A
random model seldom samples </s>, so its answers run to the length cap: the figures are an upper bound for
answers of that length (a trained model stops earlier).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from model.heads import RewardModel  # noqa: E402
from trainer.checkpoint import atomic_save, model_payload  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seconds_per_iteration(log_path, key="step_time"):
    times = [json.loads(line)[key] for line in open(log_path, encoding="utf-8") if key in line]
    later = times[1:] or times
    return sum(later) / len(later)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--n_heads", type=int, default=8)
    ap.add_argument("--n_kv_heads", type=int, default=2)
    ap.add_argument("--max_seq_len", type=int, default=256)
    ap.add_argument("--answer_tokens", type=int, default=48, help="the length cap of each answer")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      max_seq_len=args.max_seq_len)
    model = Transformer(cfg)
    with tempfile.TemporaryDirectory() as out:
        atomic_save(model_payload(model, "full_sft", 0), os.path.join(out, f"full_sft_{cfg.dim}.pth"))
        atomic_save(model_payload(RewardModel.from_language_model(model), "reward", 0),
                    os.path.join(out, f"reward_{cfg.dim}.pth"))
        common = ["--out_dir", out, "--max_steps", str(args.iterations), "--max_seq_len", str(args.max_seq_len),
                  "--no_progress", "--device", args.device]
        runs = {"PPO (8 prompts, 4 epochs of updates)": ["train_ppo.py", "--batch_size", "8", "--response_length",
                                                         str(args.answer_tokens)],
                "GRPO (4 prompts x 8 answers, 1 update)": ["train_grpo.py", "--batch_size", "4", "--num_generations",
                                                           "8", "--max_completion_length", str(args.answer_tokens)]}
        print(f"model: dim {cfg.dim}, {cfg.n_layers} layers, {model.num_parameters() / 1e6:.2f}M parameters; "
              f"answers up to {args.answer_tokens} tokens; {args.device}")
        for name, cmd in runs.items():
            subprocess.run([sys.executable, *cmd, *common], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            log = os.path.join(out, f"{'ppo' if 'ppo' in cmd[0] else 'grpo'}_{cfg.dim}_log.jsonl")
            print(f"{name}: {seconds_per_iteration(log):.2f} s / iteration, of which the rollout (sampling, "
                  f"scoring, advantages) {seconds_per_iteration(log, 'rollout_time'):.2f} s")


if __name__ == "__main__":
    main()

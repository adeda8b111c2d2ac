"""Reward model: learn a score r(prompt, answer) such that the chosen answer of each pair scores higher than the
rejected one (InstructGPT, https://arxiv.org/abs/2203.02155, section 3.5). The classic RLHF road runs
pretrain -> SFT -> reward model -> PPO; DPO (train_dpo.py) is the shortcut that skips the reward model.

    python train_reward.py                                             # demo pairs, from out/full_sft_{dim}.pth
    python train_reward.py --data_path dataset/demo/dpo_identity.jsonl --eval_path held_out_pairs.jsonl
    torchrun --nproc_per_node 2 train_reward.py --batch_size 4

The model is the SFT Transformer with its LM head replaced by a scalar head (model/heads.py), read at the </s>
that ends each answer. Loss (trainer/losses.py, TRL's RewardTrainer): -log sigmoid(r_chosen - r_rejected -
margin) + optional centering. --batch_size counts pairs (each pair is two sequences). Logs accuracy (share of
pairs ranked right) and margin (mean r_chosen - r_rejected), on the training batches and on --eval_path.
Writes {out_dir}/reward_{dim}.pth; score conversations with bench/score_reward.py.
"""
from dataset.chat import DEFAULT_SYSTEM_PROMPT
from dataset.reward import RewardDataset, collate_reward_pairs
from model.heads import RewardModel, rewards_at
from trainer.args import base_parser, model_flags
from trainer.checkpoint import checkpoint_tokenizer, find_stage_checkpoint, load_model
from trainer.cli import non_negative_float, run_main
from trainer.losses import reward_pair_loss
from trainer.loop import Stage, run_training
from trainer.setup import describe_model, finish, seed_rank, start


def make_reward_step(args):
    """The stage's loss function for the shared loop: one forward over [chosen..., rejected...] rows."""

    def reward_step(model, batch, autocast):
        with autocast():
            scores = model(batch["input_ids"])                       # (2B, T): the head at every position
        rewards = rewards_at(scores, batch["last_index"])            # read at each sequence's final </s>
        chosen, rejected = rewards.chunk(2)
        margin = batch["margin"] if args.use_margin else None
        losses, center = reward_pair_loss(chosen, rejected, margin, args.center_rewards_coefficient)
        loss_sum = (losses + center).sum()
        if batch["n_pairs"] == 0:   # a dummy pair (every pair was too long): keep the graph, contribute nothing
            return loss_sum * 0.0, 0, {}
        chosen, rejected = chosen.detach(), rejected.detach()
        # Sums over pairs; the loop divides by the global number of pairs (TRL's means).
        return loss_sum, batch["n_pairs"], {
            "accuracy": (chosen > rejected).float().sum(),           # strict >: a tie is not a win (TRL)
            "margin": (chosen - rejected).sum(),
            "mean_reward": ((chosen + rejected) / 2).sum(),          # the mean of all 2B rewards
        }

    return reward_step


def main():
    parser = base_parser(__doc__, stage="reward", lr=1e-4, epochs=1, batch_size=8, max_seq_len=512,
                         data_path="dataset/demo/dpo_*.jsonl", save_interval=100)
    parser.add_argument("--init_from", default=None,
                        help="the SFT model whose body starts the reward model (default: {out_dir}/full_sft_{dim}.pth "
                             "for --dim, else the only full_sft_*.pth in --out_dir)")
    parser.add_argument("--use_margin", action="store_true",
                        help="subtract each record's 'margin' field from r_chosen - r_rejected (Llama 2; records "
                             "without one use 0)")
    parser.add_argument("--center_rewards_coefficient", type=non_negative_float, default=None,
                        help="c: + c * mean (r_chosen + r_rejected)^2 keeps rewards centred on 0 (TRL suggests 0.01)")
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="system prompt for conversations that have none ('' for none)")
    args = parser.parse_args()
    dist, precision = start(args)
    init_from = args.init_from or find_stage_checkpoint(args.out_dir, "full_sft", args.dim)
    flags = {**model_flags(args), "dropout": 0.0}   # dropout off, as TRL does: scores must be deterministic
    language_model, cfg, ckpt = load_model(init_from, flags)
    tokenizer = checkpoint_tokenizer(ckpt, init_from, args.tokenizer_path)   # the SFT model's tokenizer
    model = RewardModel.from_language_model(language_model)   # same seed on every rank: the same fresh head
    del language_model
    dist.print(f"reward model: body from {init_from}, a fresh Linear({cfg.dim}, 1) score head")
    describe_model(model, dist)
    seed_rank(args, dist)

    system_prompt = args.system_prompt or None
    data = RewardDataset(args.data_path, tokenizer, args.max_seq_len, system_prompt, args.skip_bad_lines)
    dist.print(f"data: {len(data)} pairs" + (f"; skipped {data.bad_lines} bad lines (first: {data.first_bad})"
                                              if data.bad_lines else ""))
    eval_data = None
    if args.eval_path:   # held-out pairs: loss, accuracy and margin before and after training
        eval_data = RewardDataset(args.eval_path, tokenizer, args.max_seq_len, system_prompt, flag="--eval_path")
    extra_state = {"reward": {"init_from": init_from, "data_path": args.data_path, "use_margin": args.use_margin,
                              "center_rewards_coefficient": args.center_rewards_coefficient,
                              "system_prompt": system_prompt}}
    stage = Stage(name=args.save_name, dataset=data, collate_fn=collate_reward_pairs, loss_fn=make_reward_step(args),
                  terms_per_step=args.batch_size * args.accumulation_steps, eval_dataset=eval_data,
                  init_from=init_from, extra_state=extra_state, shown_metrics=("accuracy", "margin"),
                  tokenizer=tokenizer)
    run_training(model, stage, args, dist, precision)
    finish()


if __name__ == "__main__":
    run_main(main)

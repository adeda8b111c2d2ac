"""GRPO (DeepSeekMath, https://arxiv.org/abs/2402.03300): reinforcement learning without a critic. Each prompt
is answered G times; an answer's advantage is how much better it scored than its siblings,

    A_i = (R_i - mean(R_group)) / (std(R_group) + 1e-4)

and the policy takes PPO's clipped step on every token of the answer, optionally pulled towards the frozen
starting model by beta * k3-KL. Rewards come from a reward model (train_reward.py) and/or rules
(trainer/rewards.py).

    python train_grpo.py --reward_contains "Deep TinyMind"        # a rule reward, from out/full_sft_{dim}.pth
    python train_grpo.py --reward_model out/reward_512.pth --beta 0.04
    torchrun --nproc_per_node 2 train_grpo.py --reward_contains "Deep TinyMind"

Follows TRL 1.16's GRPOTrainer (defaults and metric names: loss_type dapo, beta 0, temperature 1, epsilon 0.2,
num_iterations 1, so ratio = 1 and the clip metrics are 0: the loss value means little, watch `reward`).
MiniMind's GRPO differs: G 6, beta 0.1, population std, loss cispo with epsilon_high 5, temperature 0.8 for
sampling but raw logits for the log-probs; pass --num_generations 6 --beta 0.1 --loss_type cispo
--epsilon_high 5 for the first four. --batch_size counts PROMPTS per process (each gives G rows).
Writes {out_dir}/grpo_{dim}.pth (chat with it: python eval_model.py --checkpoint out/grpo_512.pth).
"""
import torch

from trainer.args import base_parser, model_flags
from trainer.checkpoint import checkpoint_tokenizer, find_stage_checkpoint, load_model
from trainer.cli import non_negative_float, positive_float, positive_int, run_main
from trainer.losses import (GRPO_LOSS_TYPES, SCALE_REWARDS, completion_length_metrics, grpo_aggregate,
                            grpo_clip_metrics, grpo_reward_metrics, grpo_token_losses, group_advantages,
                            masked_mean)
from trainer.rewards import add_prompt_flags, add_reward_flags, score_completions, setup_rewards
from trainer.rl import (RLStage, completion_logps, frozen_copy, load_prompts, pack_rollout, rollout_seed, run_rl,
                        sample_completions)
from trainer.setup import describe_model, finish, seed_rank, start


def make_grpo(policy, reference, reward_model, rules, tokenizer, args, dist, precision):
    """The GRPO stage's two halves for trainer/rl.py: the rollout (no gradients) and the per-mini-batch loss."""
    G = args.num_generations
    # With one update per rollout the "old" policy IS the current one: old log-probs = logps.detach() (TRL
    # computes them only when the rollout is reused, for num_iterations > 1 or several mini-batches).
    reuse = args.num_iterations > 1 or args.steps_per_generation > 1

    @torch.no_grad()
    def make_experience(prompts, iteration):
        rows = [p for p in prompts for _ in range(G)]          # G consecutive rows per prompt
        # row i of this process is row rank * len(rows) + i of the global batch
        seeds = [rollout_seed(args.seed, iteration, dist.rank * len(rows) + i) for i in range(len(rows))]
        completions = sample_completions(policy, rows, args.max_completion_length, args.temperature, seeds,
                                         args.max_seq_len)
        batch = pack_rollout(rows, completions, dist.device)
        per_func, names = score_completions(batch, tokenizer, reward_model, rules, precision.autocast)
        rewards = per_func.sum(1)
        advantages, _, _, is_std_zero = group_advantages(rewards, G, args.scale_rewards)
        batch["advantages"] = advantages
        if reuse:
            batch["old_logps"] = completion_logps(policy, batch, args.temperature, precision.autocast)[0]
        if reference is not None:
            batch["ref_logps"] = completion_logps(reference, batch, args.temperature, precision.autocast)[0]
        # dapo's normaliser: the completion tokens of the whole generation batch, all processes
        # (TRL: N_tok * GA / steps_per_generation / processes, with no gradient accumulation here).
        n_tokens = batch["completion_mask"].sum().double()
        dist.all_reduce_sum(n_tokens)
        batch["num_items_in_batch"] = n_tokens / args.steps_per_generation / dist.world_size
        metrics = {**grpo_reward_metrics(rewards, is_std_zero, per_func, names),
                   **completion_length_metrics(batch["completion_lengths"], batch["truncated"])}
        return batch, metrics

    def update_loss(mb, autocast):
        logps, entropy = completion_logps(policy, mb, args.temperature, autocast)
        mask = mb["completion_mask"]
        old_logps = mb["old_logps"] if reuse else logps.detach()
        out = grpo_token_losses(logps, old_logps, mb["advantages"], mask, args.loss_type, args.epsilon,
                                args.epsilon_high, beta=args.beta, ref_logps=mb.get("ref_logps"))
        loss = grpo_aggregate(out["per_token_loss"], mask, args.loss_type, args.max_completion_length,
                              mb["num_items_in_batch"])
        metrics = {"entropy": masked_mean(entropy.detach(), mask).item(),
                   **grpo_clip_metrics(out["ratio"].detach(), mb["advantages"], mask, args.epsilon,
                                       args.epsilon_high, args.loss_type)}
        if out["per_token_kl"] is not None:
            metrics["kl"] = masked_mean(out["per_token_kl"].detach(), mask).item()
        return loss, metrics

    return make_experience, update_loss


def make_parser():
    parser = base_parser(__doc__, stage="grpo", lr=1e-6, epochs=1, batch_size=2, max_seq_len=512,
                         data_path="dataset/demo/prompts_identity.jsonl", save_interval=100)
    # TRL trains RL with no weight decay: with it, even an update whose advantages are all 0 moves the weights
    parser.set_defaults(log_interval=1, weight_decay=0.0)
    parser.add_argument("--init_from", default=None,
                        help="the SFT model to start from (default: {out_dir}/full_sft_{dim}.pth for --dim, "
                             "else the only full_sft_*.pth in --out_dir)")
    add_reward_flags(parser)
    g = parser.add_argument_group("GRPO (TRL's names and defaults)")
    g.add_argument("--num_generations", type=positive_int, default=8, help="G: answers per prompt (at least 2)")
    g.add_argument("--max_completion_length", type=positive_int, default=256,
                   help="most tokens per answer (TRL: 512; prompt + answer must fit in --max_seq_len)")
    g.add_argument("--temperature", type=positive_float, default=1.0,
                   help="sampling temperature; the log-probs are of softmax(logits / temperature)")
    g.add_argument("--beta", type=non_negative_float, default=0.0,
                   help="weight of the k3 KL to the frozen starting model (0: no reference model is kept)")
    g.add_argument("--epsilon", type=non_negative_float, default=0.2, help="clip range below 1 (and above, "
                   "unless --epsilon_high)")
    g.add_argument("--epsilon_high", type=non_negative_float, default=None,
                   help="clip range above 1 (default: --epsilon; DAPO uses 0.28)")
    g.add_argument("--loss_type", default="dapo", choices=GRPO_LOSS_TYPES,
                   help="how per-token losses are averaged, or which surrogate (trainer/losses.py)")
    g.add_argument("--scale_rewards", default="group", choices=SCALE_REWARDS,
                   help="divide the advantages by the group's std, the batch's, or not at all (Dr. GRPO)")
    g.add_argument("--num_iterations", type=positive_int, default=1,
                   help="mu: passes of updates over each rollout (1: ratio = 1 exactly)")
    g.add_argument("--steps_per_generation", type=positive_int, default=1,
                   help="optimizer steps (shuffled mini-batches) per rollout pass")
    add_prompt_flags(parser)
    return parser


def main():
    parser = make_parser()
    args = parser.parse_args()
    if args.num_generations < 2:
        parser.error("--num_generations must be at least 2: the advantage compares answers to the same prompt")
    if args.batch_size * args.num_generations < args.steps_per_generation:
        parser.error("--steps_per_generation is larger than the rows of a rollout (--batch_size x --num_generations)")
    if args.accumulation_steps != 1:
        parser.error("--accumulation_steps is not used by GRPO: one optimizer step per mini-batch "
                     "(see --steps_per_generation)")
    dist, precision = start(args)
    init_from = args.init_from or find_stage_checkpoint(args.out_dir, "full_sft", args.dim)
    flags = {**model_flags(args), "dropout": 0.0}   # sampling and scoring must be deterministic
    policy, cfg, ckpt = load_model(init_from, flags)
    tokenizer = checkpoint_tokenizer(ckpt, init_from, args.tokenizer_path)   # the SFT model's tokenizer
    dist.print(f"policy initialised from {init_from}")
    describe_model(policy, dist)
    policy.to(dist.device)
    reference = frozen_copy(policy) if args.beta else None

    reward_model, rm_path, rules = setup_rewards(args, cfg.dim, dist, tokenizer)
    seed_rank(args, dist)

    prompts, eval_prompts = load_prompts(args, tokenizer, dist)
    make_experience, update_loss = make_grpo(policy, reference, reward_model, rules, tokenizer, args, dist,
                                             precision)
    extra_state = {"grpo": {"init_from": init_from, "reward_model": rm_path, "rules": [n for n, _ in rules],
                            "beta": args.beta, "loss_type": args.loss_type, "data_path": args.data_path}}
    stage = RLStage(name=args.save_name, prompts=prompts, trained=policy, make_experience=make_experience,
                    update_loss=update_loss, num_epochs=args.num_iterations,
                    num_minibatches=args.steps_per_generation, outputs={args.save_name: policy},
                    extra_state=extra_state, shown_metrics=("reward", "reward_std"), eval_prompts=eval_prompts,
                    policy=policy, score=lambda b: score_completions(b, tokenizer, reward_model, rules,
                                                                     precision.autocast)[0].sum(1),
                    tokenizer=tokenizer)
    run_rl(stage, args, dist, precision)
    finish()


if __name__ == "__main__":
    run_main(main)

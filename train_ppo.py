"""PPO for language models (InstructGPT, https://arxiv.org/abs/2203.02155; PPO, https://arxiv.org/abs/1707.06347)
with the four models of the textbook picture:

    actor       the policy, from the SFT model                         trained
    critic      V(s_t) per token: a RewardModel (model/heads.py)       trained (same optimizer as the actor)
                started from the reward model (TRL's examples)
    reward      scores each whole answer (train_reward.py)             frozen
    reference   the actor's starting weights                           frozen

Each iteration: the actor answers a batch of prompts (model/engine.py); the reward model scores the answers;
per-token reward r_t = -kl_coef (log pi - log pi_ref) with the score added after the last token; GAE(gamma,
lambda) gives advantages (whitened) and returns; then --num_ppo_epochs passes of --num_mini_batches updates,
each with the clipped policy loss + vf_coef x the clipped value loss. All of it is in trainer/losses.py.

    python train_ppo.py                                   # actor out/full_sft_{dim}.pth, RM out/reward_{dim}.pth
    python train_ppo.py --reward_model none --reward_contains "Deep TinyMind"   # a rule as the score
    torchrun --nproc_per_node 2 train_ppo.py

Follows TRL 1.12's PPOTrainer (defaults, metric names): answers stop at </s> (TRL's --stop_token eos; TRL's
default samples all response_length tokens); no gradient clipping (--grad_clip 0). MiniMind's PPO differs: KL
(k3) in the loss instead of the reward, kl_coef 0.02, score on the </s>, vf_coef 0.5, 2 epochs, separate
optimizers, critic from the SFT model. Without a reward model (rule scores only) the critic starts from the
SFT model with a fresh value head (MiniMind's way). --batch_size counts prompts per process and iteration.
Writes {out_dir}/{save_name}_actor_{dim}.pth (python eval_model.py --checkpoint out/ppo_actor_512.pth) and
{out_dir}/{save_name}_critic_{dim}.pth.
"""
import torch

from model.heads import RewardModel
from model.tokenizer import EOS_ID
from trainer.args import base_parser, model_flags
from trainer.checkpoint import checkpoint_tokenizer, find_stage_checkpoint, load_model, load_reward_model
from trainer.cli import non_negative_float, positive_float, positive_int, run_main
from trainer.losses import (INVALID_LOGPROB, KL_ESTIMATORS, completion_length_metrics, ppo_advantages,
                            ppo_policy_loss, ppo_rollout_metrics, ppo_value_loss)
from trainer.rewards import add_prompt_flags, add_reward_flags, score_completions, setup_rewards
from trainer.rl import (RLStage, completion_logps, critic_values, frozen_copy, load_prompts, pack_rollout,
                        rollout_seed, run_rl, sample_completions)
from trainer.setup import describe_model, finish, seed_rank, start


def make_ppo(actor, critic, reference, reward_model, rules, tokenizer, args, dist, precision):
    """The PPO stage's two halves for trainer/rl.py: the rollout with its advantages, and the update loss."""
    # TRL divides the logits by temperature + 1e-7 for every log-prob of PPO.
    temperature = args.temperature + 1e-7

    @torch.no_grad()
    def make_experience(prompts, iteration):
        # row i of this process is row rank * len(prompts) + i of the global batch
        seeds = [rollout_seed(args.seed, iteration, dist.rank * len(prompts) + i) for i in range(len(prompts))]
        completions = sample_completions(actor, prompts, args.response_length, args.temperature, seeds,
                                         args.max_seq_len)
        # Per-token tensors are response_length wide, as TRL's: an answer that stopped has the extra column.
        batch = pack_rollout(prompts, completions, dist.device, width=args.response_length)
        logps = completion_logps(actor, batch, temperature, precision.autocast)[0]
        ref_logps = completion_logps(reference, batch, temperature, precision.autocast)[0]
        values = critic_values(critic, batch, precision.autocast)
        scores = score_completions(batch, tokenizer, reward_model, rules, precision.autocast)[0].sum(1)
        if args.missing_eos_penalty is not None:   # an answer cut off by the length limit is paid less
            scores = scores - args.missing_eos_penalty * batch["truncated"].float()
        sequence_lengths = batch["completion_lengths"] - 1   # index of each answer's last token (L)
        out = ppo_advantages(logps, ref_logps, values, scores, sequence_lengths, args.kl_coef, args.kl_estimator,
                             args.gamma, args.lam, args.whiten_rewards)
        mask = out["response_mask"]
        batch.update(old_logps=torch.where(mask, logps, torch.full_like(logps, INVALID_LOGPROB)),
                     old_values=out["values"], advantages=out["advantages"], returns=out["returns"],
                     response_mask=mask, value_mask=out["value_mask"])
        metrics = {**ppo_rollout_metrics(out["kl"], logps, out["non_score_reward"], mask, scores),
                   **completion_length_metrics(batch["completion_lengths"], batch["truncated"]),
                   "val/num_eos_tokens": float((batch["completions"] == EOS_ID).sum())}
        return batch, metrics

    def update_loss(mb, autocast):
        new_logps, entropy = completion_logps(actor, mb, temperature, autocast)
        new_values = critic_values(critic, mb, autocast)
        pg_loss, pg = ppo_policy_loss(new_logps, mb["old_logps"], mb["advantages"], mb["response_mask"],
                                      args.cliprange)
        vf_loss, vf = ppo_value_loss(new_values, mb["old_values"], mb["returns"], mb["value_mask"],
                                     args.cliprange_value)
        loss = pg_loss + args.vf_coef * vf_loss
        # TRL's *_avg: means over the updates of the iteration (the loop averages these per-update values).
        return loss, {"policy/approxkl_avg": pg["approxkl"].item(), "policy/clipfrac_avg": pg["clipfrac"].item(),
                      "loss/policy_avg": pg_loss.item(), "loss/value_avg": vf_loss.item(),
                      "val/clipfrac_avg": vf["clipfrac"].item(), "val/ratio": pg["ratio_mean"].item(),
                      "policy/entropy_avg": entropy.detach().mean().item()}   # all positions, as TRL

    return make_experience, update_loss


def make_parser():
    parser = base_parser(__doc__, stage="ppo", lr=3e-6, epochs=1, batch_size=8, max_seq_len=512,
                         data_path="dataset/demo/prompts_identity.jsonl", save_interval=100)
    # TRL's PPO loop clips no gradients and, like all of TRL's RL, uses no weight decay
    parser.set_defaults(log_interval=1, grad_clip=0.0, weight_decay=0.0)
    parser.add_argument("--init_from", default=None,
                        help="the SFT model: the actor and the reference (default: {out_dir}/full_sft_{dim}.pth for "
                             "--dim, else the only full_sft_*.pth in --out_dir)")
    add_reward_flags(parser)
    g = parser.add_argument_group("PPO (TRL 1.12's names and defaults)")
    g.add_argument("--response_length", type=positive_int, default=53, help="most tokens per answer")
    g.add_argument("--temperature", type=positive_float, default=0.7, help="sampling temperature")
    g.add_argument("--kl_coef", type=non_negative_float, default=0.05, help="weight of the per-token KL penalty")
    g.add_argument("--kl_estimator", default="k1", choices=KL_ESTIMATORS[::2], help="k1 (can be < 0) or k3 (>= 0)")
    g.add_argument("--missing_eos_penalty", type=non_negative_float, default=None,
                   help="subtracted from the score of an answer without </s> (default: none)")
    g.add_argument("--whiten_rewards", action="store_true",
                   help="normalise the per-token rewards' spread over the batch (needs >= 8 answers)")
    g.add_argument("--cliprange", type=non_negative_float, default=0.2, help="policy ratio clip epsilon")
    g.add_argument("--cliprange_value", type=non_negative_float, default=0.2, help="value clip epsilon")
    g.add_argument("--vf_coef", type=non_negative_float, default=0.1, help="weight of the value loss")
    g.add_argument("--gamma", type=non_negative_float, default=1.0, help="discount")
    g.add_argument("--lam", type=non_negative_float, default=0.95, help="GAE lambda")
    g.add_argument("--num_ppo_epochs", type=positive_int, default=4, help="passes of updates over each rollout")
    g.add_argument("--num_mini_batches", type=positive_int, default=1, help="updates per pass")
    add_prompt_flags(parser)
    return parser


def main():
    parser = make_parser()
    args = parser.parse_args()
    if args.whiten_rewards and args.batch_size < 8:
        parser.error("--whiten_rewards needs at least 8 answers per process (--batch_size 8): the variance of "
                     "fewer is too noisy (TRL asserts the same)")
    if args.num_mini_batches > args.batch_size:
        parser.error("--num_mini_batches is larger than --batch_size (the answers of one rollout)")
    if args.accumulation_steps != 1:
        parser.error("--accumulation_steps is not used by PPO: one optimizer step per mini-batch "
                     "(see --num_mini_batches)")
    dist, precision = start(args)
    init_from = args.init_from or find_stage_checkpoint(args.out_dir, "full_sft", args.dim)
    actor, cfg, ckpt = load_model(init_from, {**model_flags(args), "dropout": 0.0})   # dropout off, as TRL
    tokenizer = checkpoint_tokenizer(ckpt, init_from, args.tokenizer_path)   # the SFT model's tokenizer
    dist.print(f"actor and reference initialised from {init_from}")
    describe_model(actor, dist)
    reference = frozen_copy(actor).to(dist.device)
    reward_model, rm_path, rules = setup_rewards(args, cfg.dim, dist, tokenizer)
    if rm_path is not None:   # the critic starts as the reward model: it already judges answers
        critic = load_reward_model(rm_path, {"max_seq_len": args.max_seq_len, "dropout": 0.0})[0]
    else:                     # rule scores only: the SFT body with a fresh value head (MiniMind)
        critic = RewardModel.from_language_model(actor)
    dist.print(f"critic initialised from {rm_path or init_from + ' (a fresh value head)'}")
    seed_rank(args, dist)

    prompts, eval_prompts = load_prompts(args, tokenizer, dist)
    actor_critic = torch.nn.ModuleDict({"actor": actor, "critic": critic}).to(dist.device)  # one AdamW for both
    make_experience, update_loss = make_ppo(actor, critic, reference, reward_model, rules, tokenizer, args, dist,
                                            precision)
    extra_state = {"ppo": {"init_from": init_from, "reward_model": rm_path, "rules": [n for n, _ in rules],
                           "kl_coef": args.kl_coef, "data_path": args.data_path}}
    stage = RLStage(name=args.save_name, prompts=prompts, trained=actor_critic, make_experience=make_experience,
                    update_loss=update_loss, num_epochs=args.num_ppo_epochs, num_minibatches=args.num_mini_batches,
                    outputs={f"{args.save_name}_actor": actor, f"{args.save_name}_critic": critic},
                    extra_state=extra_state, shown_metrics=("objective/scores", "objective/kl"),
                    eval_prompts=eval_prompts, policy=actor,
                    score=lambda b: score_completions(b, tokenizer, reward_model, rules, precision.autocast)[0].sum(1),
                    tokenizer=tokenizer)
    run_rl(stage, args, dist, precision)
    finish()


if __name__ == "__main__":
    run_main(main)

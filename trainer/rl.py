"""What PPO (train_ppo.py) and GRPO (train_grpo.py) share: rollouts, per-token log-probs and values of the
completions, reward-model scores, and the RL training loop.

An RL iteration does not fit the shared loop (trainer/loop.py), which reads fixed samples from a dataset: here
the samples are MADE by the model being trained, and each batch of them is used for several optimizer steps.

    for each iteration:
        prompts  = the next --batch_size prompts of this process (dataset/sampler.py's plan)
        rollout  = the policy answers them (model/engine.py: batched, KV cache, rows stop at </s>)
        scored   = the stage scores the answers and turns them into advantages (no gradients)
        for each of `num_epochs` passes:            PPO: num_ppo_epochs; GRPO: num_iterations
            for each of `num_minibatches` shuffled slices of the rollout:
                loss = the stage's loss; backward; gradients averaged over processes; optimizer step

Layout of a rollout batch (`pack_rollout`): row i is prompt p_i (P_i tokens) followed by completion y_i (C_i
tokens, ending with </s> unless it hit the length limit), right-padded. Per-token tensors (N, T) cover the
completion tokens only, T = the longest completion: column t is y_t, and everything computed for it (its
log-prob, the critic's value V(s_t)) comes from the position that PREDICTS it, P_i - 1 + t.
"""
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dataset.prompts import PromptDataset
from dataset.sampler import BatchPlan
from model.engine import Engine, Request
from model.heads import rewards_at
from model.tokenizer import EOS_ID, PAD_ID
from trainer.checkpoint import atomic_save, model_payload, read_checkpoint, resume_path, stage_path, unwrap
from trainer.cli import UserError
from trainer.loop import StopRequest, capture_rng, check_resume_flags, make_optimizer, restore_rng
from trainer.losses import token_logps_and_entropy
from trainer.metrics import MetricsLogger, TrainingProgress
from trainer.schedule import lr_at


# ---------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------

def load_prompts(args, tokenizer, dist):
    """The training prompts (--data_path) and the held-out ones (--eval_path, or None: the reward of the greedy
    answers before and after training), rendered with the stage's --system_prompt."""
    system_prompt = args.system_prompt or None
    prompts = PromptDataset(args.data_path, tokenizer, args.max_seq_len, system_prompt, args.skip_bad_lines)
    dist.print(f"data: {len(prompts)} prompts" + (f"; skipped {prompts.bad_lines} bad lines (first: "
                                                  f"{prompts.first_bad})" if prompts.bad_lines else ""))
    if not args.eval_path:
        return prompts, None
    return prompts, PromptDataset(args.eval_path, tokenizer, args.max_seq_len, system_prompt, flag="--eval_path")


def rollout_seed(seed, iteration, row=None):
    """The sampling seed of one completion: fixed by (run seed, iteration, row of the GLOBAL batch), so a
    resumed run samples what the uninterrupted run would have, and N processes sample what one process with
    N times the batch would. row=None: the seed of the iteration's mini-batch shuffle."""
    keys = [seed % 2 ** 32, iteration] + ([0] if row is None else [1, row])
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@torch.no_grad()
def sample_completions(model, prompts, max_new_tokens, temperature, seeds, max_len):
    """One completion per prompt (lists of ids), all decoded together by the engine. A completion is every
    sampled token up to and including the first </s>, or max_new_tokens tokens (TRL: stop_token='eos')."""
    engine = Engine(unwrap(model), max_batch_size=len(prompts), max_len=max_len)
    requests = [Request(list(p), max_new_tokens=max_new_tokens, temperature=temperature, seed=s)
                for p, s in zip(prompts, seeds)]
    for request in requests:
        engine.add(request)
    while engine.has_work():
        engine.step()
    return [r.tokens for r in requests]


def pack_rollout(prompts, completions, device, width=None):
    """Prompts and their completions as the tensors the stages need (see the module note). width: T, the
    columns of the per-token tensors (default: the longest completion; PPO passes its fixed response_length,
    as TRL's responses always have, so a finished answer always has the extra value-mask column after it):
      input_ids (N, L)        prompt + completion, right-padded with PAD_ID (causal attention: the padding
                              after a row's tokens never changes what its real positions compute)
      completions (N, T)      the completion tokens, PAD_ID after each one's end
      completion_mask (N, T)  True on completion tokens (the </s> included)
      predict_at (N, T)       the position of input_ids whose output predicts completion token t
      last_index (N,)         the position of each row's last token (its </s> when it stopped)
      prompt_lengths, completion_lengths (N,), truncated (N,) bool: no </s> (stopped by the length limit)"""
    n = len(prompts)
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    completion_lengths = torch.tensor([len(c) for c in completions])
    L, T = int((prompt_lengths + completion_lengths).max()), width or int(completion_lengths.max())
    input_ids = torch.full((n, L), PAD_ID, dtype=torch.long)
    tokens = torch.full((n, T), PAD_ID, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, :len(p) + len(c)] = torch.tensor(list(p) + list(c))
        tokens[i, :len(c)] = torch.tensor(c)
    columns = torch.arange(T)
    mask = columns[None, :] < completion_lengths[:, None]
    # Positions past a row's end are clamped inside the sequence: they are masked out wherever they are used.
    predict_at = (prompt_lengths[:, None] - 1 + columns[None, :]).clamp(max=L - 1)
    truncated = torch.tensor([len(c) == 0 or c[-1] != EOS_ID for c in completions])
    batch = {"input_ids": input_ids, "completions": tokens, "completion_mask": mask, "predict_at": predict_at,
             "last_index": prompt_lengths + completion_lengths - 1, "prompt_lengths": prompt_lengths,
             "completion_lengths": completion_lengths, "truncated": truncated}
    return {k: v.to(device) for k, v in batch.items()}


def at_completion(per_position, batch):
    """(N, L, ...) outputs of a forward over input_ids -> (N, T, ...) at the positions predicting each
    completion token."""
    index = batch["predict_at"]
    if per_position.dim() == 3:
        index = index.unsqueeze(-1).expand(-1, -1, per_position.shape[-1])
    return per_position.gather(1, index)


def completion_logps(model, batch, temperature, autocast):
    """log pi(y_t) and the entropy of each completion position, under softmax(z / temperature), (N, T)
    each, float32 (trainer/losses.py token_logps_and_entropy). Differentiable when called with grad on.
    Only the positions that predict a completion token go through the LM head: the prompts and the padding
    (N x L positions against N x T) need no logits at all."""
    with autocast():
        hidden = model(batch["input_ids"], return_hidden=True)              # (N, L, dim)
        logits = F.linear(at_completion(hidden, batch), unwrap(model).output.weight)    # (N, T, vocab)
    return token_logps_and_entropy(logits, batch["completions"], temperature)


def critic_values(critic, batch, autocast):
    """PPO's critic: the value V(s_t) of the state before each completion token t, (N, T). Column T of an
    answer that stopped early lies one past its </s>: the state after the whole answer (TRL's value mask)."""
    with autocast():
        values = critic(batch["input_ids"])        # (N, L): the scalar head at every position
    return at_completion(values.float(), batch)


@torch.no_grad()
def reward_model_scores(reward_model, batch, autocast):
    """The reward model's score of each whole answer, read at its last token: the </s> it was trained to read
    (train_reward.py); a truncated answer is read at its last sampled token. (N,) float32."""
    with autocast():
        scores = reward_model(batch["input_ids"])
    return rewards_at(scores.float(), batch["last_index"])


def frozen_copy(model):
    """A frozen twin (PPO/GRPO reference): eval mode, no gradients, never in the optimizer."""
    return copy.deepcopy(unwrap(model)).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

@dataclass
class RLStage:
    """What an RL stage plugs into run_rl.

    make_experience(prompts, iteration) -> (experience, metrics): the rollout and everything computed from it
    without gradients; experience is a dict of tensors whose first dimension is the row (sliced into
    mini-batches), metrics a dict of floats to log once per iteration.
    update_loss(minibatch, autocast) -> (loss, metrics): the loss to minimise on one mini-batch (already a
    mean), and floats to average over the iteration's updates."""
    name: str                     # the checkpoint prefix of the trained model: "grpo", "ppo_actor"
    prompts: object               # dataset/prompts.py PromptDataset
    trained: torch.nn.Module      # every trained parameter: the policy (GRPO), the actor and critic (PPO)
    make_experience: object
    update_loss: object
    num_epochs: int = 1
    num_minibatches: int = 1
    # {checkpoint prefix: module}: the models written as {out_dir}/{prefix}_{dim}.pth (the actor; PPO's critic)
    outputs: dict = field(default_factory=dict)
    extra_state: dict = field(default_factory=dict)
    shown_metrics: tuple = ()
    # --eval_path: held-out prompts, answered greedily by `policy` before and after training; `score`
    # (rollout batch -> (N,) total reward) gives their mean reward
    eval_prompts: object = None
    policy: torch.nn.Module = None
    score: object = None
    tokenizer: object = None      # the policy's Tokenizer: its tokenizer.json goes into every checkpoint


def minibatches(experience, n_rows, num_minibatches, generator):
    """Shuffled slices of the rollout's rows: each epoch sees every row once, in a new order (TRL)."""
    order = torch.randperm(n_rows, generator=generator)
    for part in order.chunk(num_minibatches):
        yield {k: v[part.to(v.device)] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n_rows else v
               for k, v in experience.items()}


def average_over_processes(values, dist):
    """{name: float} averaged over the processes (one all-reduce)."""
    if not dist.enabled or not values:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=dist.device)
    dist.all_reduce_sum(packed)
    return {k: v / dist.world_size for k, v in zip(keys, packed.tolist())}


def average_gradients(parameters, dist):
    """Each process's gradient is of its own rows' loss: averaging them is the gradient of the mean over all
    rows (what DDP does inside backward; done here explicitly because the trained module is called several
    ways per update: policy forward, critic forward)."""
    if not dist.enabled:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce_sum(p.grad)
            p.grad.div_(dist.world_size)


@torch.no_grad()
def held_out_reward(stage, args, dist, batch_size=16):
    """Mean reward and length of the greedy answers (temperature 0: no sampling noise) to the held-out
    prompts, each process answering its share."""
    mine = list(range(dist.rank, len(stage.eval_prompts), dist.world_size))
    totals = torch.zeros(3, dtype=torch.float64, device=dist.device)   # reward sum, length sum, answers
    for i in range(0, len(mine), batch_size):
        prompts = [stage.eval_prompts[j] for j in mine[i:i + batch_size]]
        completions = sample_completions(stage.policy, prompts, args.eval_max_new_tokens, 0.0, [0] * len(prompts),
                                         args.max_seq_len)
        batch = pack_rollout(prompts, completions, dist.device)
        totals += torch.stack([stage.score(batch).double().sum(), batch["completion_lengths"].double().sum(),
                               torch.tensor(float(len(prompts)), dtype=torch.float64, device=dist.device)])
    dist.all_reduce_sum(totals)
    return {"eval_reward": totals[0].item() / totals[2].item(), "eval_mean_length": totals[1].item() / totals[2].item()}


def check_rl_flags(args, precision):
    """The shared flags that the RL loop does not implement: refused, never silently ignored."""
    for flag in ("fsdp", "compile"):
        if getattr(args, flag):
            raise UserError(f"--{flag} is not supported by the RL stages (train_ppo.py, train_grpo.py) yet: drop it")
    if args.num_workers:
        raise UserError("--num_workers: the RL stages read no batches in the background (prompts are few and "
                        "short): drop it")
    if precision.grad_scaler().is_enabled():
        raise UserError("--dtype float16 needs loss scaling, which the RL stages do not do: use --dtype bfloat16 "
                        "or float32")


def run_rl(stage: RLStage, args, dist, precision):
    """Train stage.trained for --epochs passes over the prompts (--batch_size prompts per process and
    iteration) or --max_steps iterations. Checkpoints every --save_interval iterations and at the end;
    --resume continues bit for bit. Returns the path of the first output checkpoint."""
    check_rl_flags(args, precision)
    device = dist.device
    trained = stage.trained.to(device)
    for module in stage.outputs.values():   # both a Transformer and a RewardModel (the critic) have it
        module.set_grad_checkpointing(args.grad_checkpointing)
    dim = next(iter(stage.outputs.values())).cfg.dim
    out_paths = {prefix: stage_path(args.out_dir, prefix, dim) for prefix in stage.outputs}
    res_path = resume_path(args.out_dir, stage.name, dim)
    try:
        plan = BatchPlan(len(stage.prompts), args.batch_size, 1, dist.world_size, dist.rank, args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    total = args.epochs * plan.steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = min(args.warmup_iters, total // 5)
    optimizer = make_optimizer(trained, args.learning_rate, args.weight_decay, device)
    params = [p for p in trained.parameters() if p.requires_grad]

    start, wandb_id, counters = 0, None, {"tokens": 0, "nonfinite_steps": 0, "samples": 0}
    if args.resume:
        if not os.path.exists(res_path):
            raise UserError(f"--resume: no resume file {res_path}; drop --resume to start from the beginning")
        state = read_checkpoint(res_path)
        check_resume_flags(state["args"], args, state["world_size"], dist.world_size, res_path, dist)
        trained.load_state_dict(state["trained"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        start, wandb_id, counters = state["step"], state.get("wandb_id"), state["counters"]
        if state["world_size"] == dist.world_size:
            restore_rng(state["rng"][dist.rank])
        dist.print(f"resumed from {res_path} at iteration {start}")

    logger = MetricsLogger(os.path.join(args.out_dir, f"{stage.name}_{dim}_log.jsonl"), dist.is_main,
                           args.use_wandb, args.wandb_project, f"{stage.name}_{dim}", vars(args), wandb_id, start)

    def save(step):
        rng = dist.all_gather_object(capture_rng())
        if dist.is_main:
            run = {**stage.extra_state, "args": {**vars(args), "_argv": sys.argv[1:]}}
            for prefix, module in stage.outputs.items():
                atomic_save({**model_payload(module, prefix, step, tokenizer=stage.tokenizer), **run},
                            out_paths[prefix])
            atomic_save({**run, "trained": trained.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "world_size": dist.world_size, "rng": rng, "wandb_id": logger.wandb_id,
                         "counters": dict(counters)}, res_path)
        dist.barrier()

    dist.print(f"{stage.name}: {len(stage.prompts)} prompts, {total} iterations of {args.batch_size} prompts x "
               f"{dist.world_size} processes; {stage.num_epochs} epoch(s) x {stage.num_minibatches} mini-batch(es) "
               f"of updates per rollout")
    def evaluate(phase, at_step):
        dist.print(f"held-out evaluation: greedy answers to {len(stage.eval_prompts)} prompts ...")
        results = held_out_reward(stage, args, dist)
        logger.log({"step": at_step, "phase": phase, **results})
        dist.print(f"held-out {phase} training: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    if stage.eval_prompts is not None and start == 0:
        evaluate("before", 0)
    stop = StopRequest()
    progress = TrainingProgress(stage.name, total, start, dist.is_main, args.no_progress, 4, stage.shown_metrics)
    step = start
    try:
        for step in range(start, total):
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            prompt_ids = [stage.prompts[i] for i in plan.micro_batches(epoch, in_epoch)[0]]
            lr = lr_at(step, total, args.learning_rate, warmup, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            trained.eval()   # dropout off while sampling and scoring (the stages also load with dropout 0)
            experience, rollout_metrics = stage.make_experience(prompt_ids, step)
            t_rollout = time.time() - t0
            n_rows = len(experience["input_ids"])
            trained.train()
            shuffle = torch.Generator().manual_seed(rollout_seed(args.seed, step) + dist.rank)
            update_sums, n_updates, losses = {}, 0, []
            for _ in range(stage.num_epochs):
                for mb in minibatches(experience, n_rows, stage.num_minibatches, shuffle):
                    loss, metrics = stage.update_loss(mb, precision.autocast)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    average_gradients(params, dist)
                    finite = torch.tensor([float(math.isfinite(loss.item()))], device=device)
                    dist.all_reduce_sum(finite)
                    if finite.item() < dist.world_size:   # a NaN/inf on any process: no process steps
                        counters["nonfinite_steps"] += 1
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    if args.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                    optimizer.step()
                    losses.append(loss.item())
                    for k, v in metrics.items():
                        update_sums[k] = update_sums.get(k, 0.0) + float(v)
                    n_updates += 1
            optimizer.zero_grad(set_to_none=True)
            sizes = torch.tensor([float(experience["completion_mask"].sum()), float(n_rows)], device=device)
            dist.all_reduce_sum(sizes)                    # completion tokens and answers of all processes
            counters["tokens"] += int(sizes[0])
            counters["samples"] += int(sizes[1])
            step_time = time.time() - t0
            record = {"loss": sum(losses) / max(len(losses), 1), **rollout_metrics,
                      **{k: v / max(n_updates, 1) for k, v in update_sums.items()}}
            record = average_over_processes(record, dist)
            record = {"step": step, **{k: round(v, 6) for k, v in record.items()}, "lr": lr,
                      "rollout_time": round(t_rollout, 3), "step_time": round(step_time, 3),
                      "tokens_per_s": round(float(sizes[0]) / max(step_time, 1e-9), 1), "tokens": counters["tokens"],
                      "episode": counters["samples"], "skipped_steps": counters["nonfinite_steps"]}
            if step % args.log_interval == 0 or step + 1 == total:
                logger.log(record)
                progress.step(step + 1, record)
            else:
                progress.step(step + 1)
            halt = torch.tensor([float(stop.requested)], device=device)
            dist.all_reduce_sum(halt)
            if halt.item():
                dist.print(f"\nstopped at iteration {step + 1}: resume with the same command plus --resume")
                save(step + 1)
                raise SystemExit(130)
            if args.save_interval and (step + 1) % args.save_interval == 0 and step + 1 < total:
                save(step + 1)
        step = total
        if counters["nonfinite_steps"] and counters["nonfinite_steps"] * 2 > max(total - start, 1) * \
                stage.num_epochs * stage.num_minibatches:
            raise UserError(f"nothing was learnt: {counters['nonfinite_steps']} updates had a NaN/inf loss (lower "
                            f"--learning_rate, or try --dtype float32); {', '.join(out_paths.values())} not written")
        save(step)
    finally:
        stop.restore()
        progress.close()
    if stage.eval_prompts is not None:
        evaluate("after", step)
    logger.finish()
    dist.print(f"saved {', '.join(out_paths.values())} ({step} iterations, {counters['samples']:,} completions, "
               f"{counters['tokens']:,} completion tokens, {counters['nonfinite_steps']} skipped updates)")
    return next(iter(out_paths.values()))

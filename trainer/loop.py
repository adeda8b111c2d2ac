"""The training loop every stage shares. A stage supplies its data and a loss function; this file does the rest.

One optimizer step:
  1. the LR from the schedule;
  2. `accumulation_steps` micro-batches: forward + backward each, gradients summed (DDP all-reduces only on
     the last one: `no_sync` skips the communication of the others);
  3. the loss is normalised by the number of loss terms in the WHOLE global batch (all micro-batches, all
     ranks), counted exactly with one all-reduce. So padding, uneven SFT masks or N GPUs never change what a
     step computes: 2 processes x batch 4 give the same update as 1 process x batch 8;
  4. a non-finite loss skips the step (counted, logged) so it never reaches the weights;
  5. gradient clipping, optimizer step, logging, checkpoints.
"""
import contextlib
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from dataset.sampler import BatchPlan
from trainer.checkpoint import atomic_save, model_payload, read_checkpoint, resume_path, stage_path, unwrap
from trainer.evaluate import held_out_loss
from trainer.metrics import MetricsLogger
from trainer.schedule import lr_at


@dataclass
class Stage:
    """What a training stage plugs into the shared loop.

    loss_fn(model, batch, autocast) -> (loss_sum, n_terms, metric_sums): a scalar tensor that is the SUM of
    the per-term losses (tokens or pairs), the number of terms, and a dict of other per-term sums to log as
    means (e.g. DPO rewards). `terms_per_step` is a fixed estimate of n_terms per process and step, used only
    to keep the summed loss at a sane magnitude before the exact global normalisation."""
    name: str                    # "pretrain", "full_sft", "rlhf": the checkpoint prefix
    dataset: object
    collate_fn: object
    loss_fn: object
    terms_per_step: float
    eval_dataset: object = None  # optional held-out data: its mean loss is measured before and after training
    log_decimals: int = 4
    extra_state: dict = field(default_factory=dict)   # saved into every checkpoint (e.g. the stage's flags)


def capture_rng():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(model, lr, weight_decay, device):
    """AdamW; weight decay on matrices only (norm gains are scales, decaying them towards 0 only hurts).
    The fused CUDA kernel updates all parameters in one launch."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes the current step, saves, and exits. All ranks agree on
    the step to stop at through the per-step all-reduce."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_training(model, stage: Stage, args, dist, precision):
    """Train `model` (a plain Transformer, already initialised/loaded, on CPU) for the stage. Returns the path
    of the final stage checkpoint."""
    device = dist.device
    model.to(device)
    cfg = unwrap(model).cfg
    out_path = stage_path(args.out_dir, stage.name, cfg.dim)
    res_path = resume_path(args.out_dir, stage.name, cfg.dim)

    plan = BatchPlan(len(stage.dataset), args.batch_size, args.accumulation_steps, dist.world_size, dist.rank,
                     args.seed)
    total_steps = args.epochs * plan.steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = min(args.warmup_iters, total_steps // 5)
    if warmup != args.warmup_iters:
        dist.print(f"note: --warmup_iters {args.warmup_iters} cut to {warmup} (a fifth of the {total_steps} steps)")
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay, device)
    scaler = precision.grad_scaler()

    start_step, wandb_id = 0, None
    counters = {"tokens": 0, "skipped_steps": 0, "dropped_samples": 0}  # cumulative, carried across a resume
    if args.resume:
        if not os.path.exists(res_path):
            raise FileNotFoundError(f"--resume: no resume file {res_path}")
        state = read_checkpoint(res_path)
        if state["config"] != cfg.to_dict():
            raise ValueError(f"--resume: {res_path} was written for config {state['config']}, not {cfg.to_dict()}")
        unwrap(model).load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step, wandb_id, counters = state["step"], state.get("wandb_id"), state["counters"]
        if state["world_size"] == dist.world_size:
            restore_rng(state["rng"][dist.rank])
        else:
            dist.print(f"warning: resuming with {dist.world_size} processes, saved with {state['world_size']}: "
                       "the data order is kept, the random streams (dropout) are not")
        dist.print(f"resumed from {res_path} at step {start_step}/{total_steps}")

    train_model = model
    if args.compile:
        train_model = torch.compile(train_model)
    if dist.enabled:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = MetricsLogger(os.path.join(args.out_dir, f"{stage.name}_{cfg.dim}_log.jsonl"), dist.is_main,
                           args.use_wandb, args.wandb_project, f"{stage.name}_{cfg.dim}",
                           {**vars(args), "model": cfg.to_dict()}, wandb_id, start_step)

    def save(step):
        """Rank 0 writes the stage checkpoint and the resume file; every rank contributes its RNG state."""
        rng = dist.all_gather_object(capture_rng())
        if dist.is_main:
            # The flags go in too (and the command line), so a checkpoint says how it was made.
            payload = {**model_payload(model, stage.name, step), **stage.extra_state,
                       "args": {**vars(args), "_argv": sys.argv[1:]}}
            atomic_save(payload, out_path)
            atomic_save({**payload, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "step": step, "epoch": step // plan.steps_per_epoch, "world_size": dist.world_size,
                         "rng": rng, "wandb_id": logger.wandb_id,
                         "counters": {"tokens": tokens_seen, "skipped_steps": skipped, "dropped_samples": dropped}},
                        res_path)
        dist.barrier()

    def step_batches(first_step):
        """Yield the list of micro-batches of each optimizer step from `first_step` on."""
        step = first_step
        while step < total_steps:
            epoch = step // plan.steps_per_epoch
            in_epoch = step % plan.steps_per_epoch
            loader = DataLoader(stage.dataset, batch_sampler=plan.micro_batches(epoch, in_epoch),
                                collate_fn=stage.collate_fn, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda")
            it = iter(loader)
            for _ in range(in_epoch, plan.steps_per_epoch):
                if step >= total_steps:
                    return
                yield step, [next(it) for _ in range(args.accumulation_steps)]
                step += 1

    dist.print(f"{stage.name}: {len(stage.dataset)} samples, {plan.steps_per_epoch} steps/epoch, "
               f"{total_steps} steps; global batch {args.batch_size * dist.world_size * args.accumulation_steps} "
               f"= {args.batch_size} x {dist.world_size} processes x {args.accumulation_steps} accumulation")
    bar = None
    if dist.is_main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc=stage.name, dynamic_ncols=True)

    def evaluate():
        return held_out_loss(model, stage.eval_dataset, stage.collate_fn, stage.loss_fn, args.batch_size, dist,
                             precision)

    if stage.eval_dataset is not None and start_step == 0:
        results = evaluate()
        logger.log({"step": 0, "phase": "before", **results})
        dist.print("held-out before training: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    stop = StopRequest()
    tokens_seen, skipped, dropped = counters["tokens"], counters["skipped_steps"], counters["dropped_samples"]
    last_step = start_step
    model.train()
    t_log, tokens_since_log = time.time(), 0
    try:
        for step, micro_batches in step_batches(start_step):
            lr = lr_at(step, total_steps, args.learning_rate, warmup, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            n_terms, step_tokens, n_dropped, metric_sums = 0, 0, 0, {}
            for i, batch in enumerate(micro_batches):
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                last = i == len(micro_batches) - 1
                sync = last or not dist.enabled
                with contextlib.nullcontext() if sync else train_model.no_sync():
                    loss, n, metrics = stage.loss_fn(train_model, batch, precision.autocast)
                    # Scale by a fixed constant (the same on every rank); corrected exactly after the step.
                    scaler.scale(loss / stage.terms_per_step).backward()
                loss_sum += loss.detach().double()
                n_terms += n
                step_tokens += batch["input_ids"].numel()
                n_dropped += batch.get("n_dropped", 0)  # samples with nothing left to learn after truncation
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
            # One all-reduce for everything the step needs to know globally.
            keys = sorted(metric_sums)
            packed = torch.tensor([loss_sum.item(), n_terms, step_tokens, float(stop.requested), n_dropped]
                                  + [metric_sums[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce_sum(packed)
            g_loss, g_terms, g_tokens, g_stop, g_dropped = packed[:5].tolist()
            g_metrics = {k: v / max(g_terms, 1) for k, v in zip(keys, packed[5:].tolist())}
            dropped += int(g_dropped)
            mean_loss = g_loss / max(g_terms, 1)

            grad_norm = None
            if not math.isfinite(mean_loss) or g_terms == 0:
                skipped += 1  # never let a NaN/inf (or an empty batch) touch the weights
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update(scaler.get_scale() / 2)
            else:
                scaler.unscale_(optimizer)
                # DDP averaged the per-rank gradients of loss_sum / terms_per_step. Turn that into the
                # gradient of (global loss sum) / (global number of terms):
                correction = dist.world_size * stage.terms_per_step / g_terms
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(correction)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            tokens_seen += int(g_tokens)
            tokens_since_log += int(g_tokens)
            last_step = step + 1

            if step % args.log_interval == 0 or last_step == total_steps:
                elapsed = time.time() - t_log
                tps = tokens_since_log / max(elapsed, 1e-9)
                t_log, tokens_since_log = time.time(), 0
                record = {"step": step, "epoch": step // plan.steps_per_epoch, "loss": round(mean_loss, 6),
                          "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(tps, 1), "tokens": tokens_seen,
                          "skipped_steps": skipped, "dropped_samples": dropped,
                          **{k: round(v, 6) for k, v in g_metrics.items()}}
                logger.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.{stage.log_decimals}f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            if bar is not None:
                bar.update(1)
            if args.save_interval and last_step % args.save_interval == 0 and last_step < total_steps:
                save(last_step)
            if g_stop:
                dist.print(f"\nstop requested: saving at step {last_step} (resume with --resume)")
                save(last_step)
                raise SystemExit(130)
        save(last_step)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    if stage.eval_dataset is not None:
        results = evaluate()
        logger.log({"step": last_step, "phase": "after", **results})
        dist.print("held-out after training: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    logger.finish()
    dist.print(f"saved {out_path} ({last_step} steps, {tokens_seen:,} tokens, {skipped} skipped steps, "
               f"{dropped} samples dropped as truncated away)")
    return out_path


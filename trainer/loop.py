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
from trainer.args import RESUME_FIXED
from trainer.checkpoint import (atomic_save, config_difference, model_payload, read_checkpoint, resume_path,
                                stage_path, unwrap)
from trainer.cli import UserError, is_main_rank
from trainer.evaluate import held_out_loss
from trainer.fsdp import full_model_state, full_norm, full_optimizer_state, is_sharded, load_full_state, shard_model
from trainer.metrics import MetricsLogger, TrainingProgress
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
    shown_metrics: tuple = ()    # the stage's metrics the progress bar shows after the loss (all go to the log)
    extra_state: dict = field(default_factory=dict)   # saved into every checkpoint (e.g. the stage's flags)
    init_from: str = None        # the checkpoint the model was loaded from: never overwritten by this run
    # What "model" holds in the checkpoints, and how a resume loads it back. Default: every weight. LoRA saves
    # and loads only its adapters (model/lora.py), so its files are small and the base stays untouched.
    save_weights: object = None  # full state dict -> the part to save
    load_weights: object = None  # (model, state dict) -> None
    tokenizer: object = None     # the Tokenizer of the data: its tokenizer.json goes into every checkpoint


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
    The fused kernel (CUDA, and CPU since PyTorch 2.4) updates each parameter in one pass instead of a dozen
    element-wise ops, each reading and writing the whole tensor: on this 2-core CPU the optimizer step of the
    demo model took 20 ms fused vs 101 ms foreach vs 593 ms with the default per-parameter loop."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cpu", "cuda"))


def wrap_model(model, args, dist, precision):
    """The module the training steps call: torch.compile'd (--compile) and/or DDP-wrapped (under torchrun), or
    sharded in place with FSDP2 (--fsdp). `model` stays the Transformer: checkpoints and evaluation use it.
    --grad_checkpointing is set on the blocks first, so under FSDP the recomputation runs inside each sharded
    block (its weights are gathered for the backward anyway)."""
    unwrap(model).set_grad_checkpointing(args.grad_checkpointing)
    if args.fsdp:
        return shard_model(model, precision)
    train_model = model
    if args.compile:
        dist.print("--compile: the first step compiles the model (tens of seconds to minutes) ...")
        train_model = torch.compile(train_model)
    if dist.enabled:
        # One GPU per process: DDP must be told which (device_ids); on CPU it takes None.
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_model = DDP(train_model, device_ids=device_ids)
    return train_model


def gradient_sync(train_model, sync):
    """With gradient accumulation only the last micro-batch's backward needs to combine gradients across
    processes (DDP's all-reduce, FSDP's reduce-scatter): the others just add into the local gradients."""
    if is_sharded(train_model):
        train_model.set_requires_gradient_sync(sync)
    elif isinstance(train_model, DDP) and not sync:
        return train_model.no_sync()
    return contextlib.nullcontext()


def check_fsdp_flags(args, stage, dist):
    if not args.fsdp:
        return
    if not dist.enabled:
        raise UserError("--fsdp shards the model over processes: run under torchrun with 2 or more "
                        "(torchrun --nproc_per_node N ...), or drop --fsdp")
    if args.compile:
        raise UserError("--fsdp with --compile is not supported yet: drop one of them")


def make_loader(dataset, batch_sampler, collate_fn, num_workers, device):
    """A DataLoader over a precomputed batch plan. pin_memory on CUDA: page-locked host batches can be
    copied to the GPU asynchronously (the .to(device, non_blocking=True) in the loop)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=device.type == "cuda")


def check_resume_flags(saved_args, args, saved_world_size, world_size, res_path, dist):
    """--resume continues THE SAME run: refuse flags that change the data order or the LR schedule (naming the
    flag, both values and how to start fresh), warn about any other changed flag."""
    fresh = "or start a fresh run without --resume (another --out_dir keeps this one's files)"
    saved_global = saved_args["batch_size"] * saved_args["accumulation_steps"] * saved_world_size
    now_global = args.batch_size * args.accumulation_steps * world_size
    if saved_global != now_global:
        raise UserError(
            f"--resume: the global batch is {now_global} (--batch_size {args.batch_size} x --accumulation_steps "
            f"{args.accumulation_steps} x {world_size} processes), but {res_path} was made with {saved_global} "
            f"({saved_args['batch_size']} x {saved_args['accumulation_steps']} x {saved_world_size}): that changes "
            f"the data order. Resume with the same global batch, {fresh}")
    current = vars(args)
    for name in RESUME_FIXED:
        if name in saved_args and saved_args[name] != current.get(name):
            raise UserError(f"--resume: --{name} {current.get(name)} differs from {saved_args[name]} in {res_path} "
                            f"(it changes the data order or the learning-rate schedule). Resume with --{name} "
                            f"{saved_args[name]}, {fresh}")
    quiet = {"resume", "debug", "no_progress", "num_workers", "_argv", "batch_size", "accumulation_steps", "fsdp",
             "grad_checkpointing"}
    for name in sorted(set(saved_args) - quiet - set(RESUME_FIXED)):
        if name in current and saved_args[name] != current[name]:
            dist.print(f"warning: --resume with --{name} {current[name]} (the run was started with {saved_args[name]})")


def load_resume(res_path, model, optimizer, scaler, args, dist, load_weights=None):
    """Load the resume file into model, optimizer and scaler after checking it belongs to this run.
    Returns (start_step, wandb_id, counters)."""
    if not os.path.exists(res_path):
        raise UserError(f"--resume: no resume file {res_path} (it is written next to the checkpoint every "
                        f"--save_interval steps); drop --resume to start from the beginning")
    state = read_checkpoint(res_path)
    cfg = unwrap(model).cfg.to_dict()
    if state["config"] != cfg:
        raise UserError(f"--resume: {res_path} holds another model ({config_difference(state['config'], cfg)})")
    check_resume_flags(state.get("args", {}), args, state["world_size"], dist.world_size, res_path, dist)
    if state.get("args", {}).get("fsdp", False) != args.fsdp:  # the optimizer state is stored differently
        raise UserError(f"--resume: {res_path} was written {'with' if not args.fsdp else 'without'} --fsdp; "
                        f"resume {'with' if not args.fsdp else 'without'} it")
    if is_sharded(model):
        load_full_state(model, optimizer, state["model"], state["optimizer"], strict=load_weights is None)
    else:
        if load_weights is not None:
            load_weights(unwrap(model), state["model"])
        else:
            unwrap(model).load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if state["world_size"] == dist.world_size:
        restore_rng(state["rng"][dist.rank])
    else:
        dist.print(f"note: resuming with {dist.world_size} processes, saved with {state['world_size']}: "
                   "the data order is kept, the random streams (dropout) are not")
    dist.print(f"resumed from {res_path} at step {state['step']}")
    return state["step"], state.get("wandb_id"), state["counters"]


def check_something_learnt(counters, steps_done, out_path):
    """Stop with a clear message when most steps changed nothing, instead of "succeeding" and saving an
    unchanged model: every sample truncated away (no supervised token left), or a loss that is always NaN.
    Short runs (under 10 steps) fail only when every step was skipped."""
    empty, nonfinite = counters["empty_steps"], counters["nonfinite_steps"]
    skipped = empty + nonfinite
    if steps_done == 0 or (skipped < steps_done if steps_done < 10 else 2 * skipped <= steps_done):
        return
    causes = []
    if empty:
        causes.append(f"{empty} had no supervised token left ({counters['dropped_samples']} samples were truncated "
                      f"away: raise --max_seq_len or check the data)")
    if nonfinite:
        causes.append(f"{nonfinite} had a NaN/inf loss (lower --learning_rate, or try --dtype float32)")
    raise UserError(f"nothing was learnt: {skipped} of {steps_done} steps were skipped: {'; '.join(causes)}. "
                    f"{out_path} was not written")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save, exit 130; all ranks agree on the step to stop
    at through the per-step all-reduce. A second Ctrl-C stops at once (KeyboardInterrupt): checkpoints are
    written atomically, so the last one stays whole.

    A repeat within a second counts as the same request: torchrun passes the terminal's Ctrl-C on to its
    workers, which have already received it from the terminal themselves."""

    def __init__(self):
        self.requested_at = None
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self):
        return self.requested_at is not None

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
            if is_main_rank():  # os.write, not print: a signal handler may interrupt a print in progress
                os.write(2, "\nstopping after this step and saving (Ctrl-C again to stop at once) ...\n".encode())
        elif now - self.requested_at > 1.0:
            raise KeyboardInterrupt

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
    if stage.init_from and os.path.abspath(stage.init_from) == os.path.abspath(out_path):
        raise UserError(f"--init_from {stage.init_from} is also this run's output: the first save would overwrite "
                        f"the model it starts from. Pass --save_name NAME (writes {args.out_dir}/NAME_{cfg.dim}.pth) "
                        f"or another --out_dir")

    try:
        plan = BatchPlan(len(stage.dataset), args.batch_size, args.accumulation_steps, dist.world_size, dist.rank,
                         args.seed)
    except ValueError as e:  # fewer samples than one step needs
        raise UserError(str(e)) from None
    total_steps = args.epochs * plan.steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = min(args.warmup_iters, total_steps // 5)
    if warmup != args.warmup_iters:
        dist.print(f"note: --warmup_iters {args.warmup_iters} cut to {warmup} (a fifth of the {total_steps} steps)")
    check_fsdp_flags(args, stage, dist)
    train_model = wrap_model(model, args, dist, precision)   # FSDP shards `model` itself, before the optimizer
    optimizer = make_optimizer(model, args.learning_rate, args.weight_decay, device)
    scaler = precision.grad_scaler()

    start_step, wandb_id = 0, None
    # Cumulative, carried across a resume. Skipped steps are counted by cause: no supervised token left in the
    # global batch ("empty"), or a NaN/inf loss.
    counters = {"tokens": 0, "empty_steps": 0, "nonfinite_steps": 0, "dropped_samples": 0}
    if args.resume:
        start_step, wandb_id, saved = load_resume(res_path, model, optimizer, scaler, args, dist, stage.load_weights)
        counters.update(saved)
        if "skipped_steps" in saved:  # a resume file from before the split by cause
            counters["nonfinite_steps"] += counters.pop("skipped_steps")

    logger = MetricsLogger(os.path.join(args.out_dir, f"{stage.name}_{cfg.dim}_log.jsonl"), dist.is_main,
                           args.use_wandb, args.wandb_project, f"{stage.name}_{cfg.dim}",
                           {**vars(args), "model": cfg.to_dict()}, wandb_id, start_step)

    def save(step, stopping=False):
        """Rank 0 writes the stage checkpoint and the resume file; every rank contributes its RNG state.
        A run that learnt nothing is stopped here instead (a Ctrl-C still gets its files)."""
        if not stopping:
            check_something_learnt(counters, step, out_path)
        rng = dist.all_gather_object(capture_rng())
        weights, optimizer_state = None, None
        if is_sharded(model):  # every process gathers its shards into the full tensors rank 0 writes
            weights, optimizer_state = full_model_state(model), full_optimizer_state(model, optimizer)
        if dist.is_main:
            # The flags go in too (and the command line), so a checkpoint says how it was made.
            payload = {**model_payload(model, stage.name, step, weights, stage.tokenizer), **stage.extra_state,
                       "args": {**vars(args), "_argv": sys.argv[1:]}, "tokens_seen": counters["tokens"]}
            if stage.save_weights is not None:
                payload["model"] = stage.save_weights(payload["model"])
            atomic_save(payload, out_path)
            optimizer_state = optimizer_state or optimizer.state_dict()
            atomic_save({**payload, "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                         "step": step, "epoch": step // plan.steps_per_epoch, "world_size": dist.world_size,
                         "rng": rng, "wandb_id": logger.wandb_id, "counters": dict(counters)}, res_path)
        dist.barrier()

    def step_batches(first_step):
        """Yield the list of micro-batches of each optimizer step from `first_step` on."""
        step = first_step
        while step < total_steps:
            epoch = step // plan.steps_per_epoch
            in_epoch = step % plan.steps_per_epoch
            loader = make_loader(stage.dataset, plan.micro_batches(epoch, in_epoch), stage.collate_fn,
                                 args.num_workers, device)
            it = iter(loader)
            for _ in range(in_epoch, plan.steps_per_epoch):
                if step >= total_steps:
                    return
                yield step, [next(it) for _ in range(args.accumulation_steps)]
                step += 1

    dist.print(f"{stage.name}: {len(stage.dataset)} samples, {plan.steps_per_epoch} steps/epoch, "
               f"{total_steps} steps; global batch {args.batch_size * dist.world_size * args.accumulation_steps} "
               f"= {args.batch_size} x {dist.world_size} processes x {args.accumulation_steps} accumulation")

    def evaluate():
        dist.print(f"held-out evaluation: {len(stage.eval_dataset)} samples ...")
        return held_out_loss(model, stage.eval_dataset, stage.collate_fn, stage.loss_fn, args.batch_size, dist,
                             precision)

    if stage.eval_dataset is not None and start_step == 0:
        results = evaluate()
        logger.log({"step": 0, "phase": "before", **results})
        dist.print("held-out before training: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    stop = StopRequest()
    progress = TrainingProgress(stage.name, total_steps, start_step, dist.is_main, args.no_progress,
                                stage.log_decimals, stage.shown_metrics)
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
                with gradient_sync(train_model, sync=i == len(micro_batches) - 1):
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
            counters["dropped_samples"] += int(g_dropped)
            mean_loss = g_loss / max(g_terms, 1)

            grad_norm = None
            if g_terms == 0 or not math.isfinite(mean_loss):
                # Never let a NaN/inf (or an empty batch) touch the weights.
                counters["empty_steps" if g_terms == 0 else "nonfinite_steps"] += 1
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled() and g_terms:
                    scaler.update(scaler.get_scale() / 2)
            else:
                scaler.unscale_(optimizer)
                # DDP averaged the per-rank gradients of loss_sum / terms_per_step. Turn that into the
                # gradient of (global loss sum) / (global number of terms):
                correction = dist.world_size * stage.terms_per_step / g_terms
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(correction)
                grad_norm = float(full_norm(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                           args.grad_clip or float("inf"))))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            counters["tokens"] += int(g_tokens)
            tokens_since_log += int(g_tokens)
            last_step = step + 1

            record = None
            if step % args.log_interval == 0 or last_step == total_steps:
                elapsed = time.time() - t_log
                tps = tokens_since_log / max(elapsed, 1e-9)
                t_log, tokens_since_log = time.time(), 0
                record = {"step": step, "epoch": step // plan.steps_per_epoch, "loss": round(mean_loss, 6),
                          "lr": lr, "grad_norm": grad_norm, "tokens_per_s": round(tps, 1),
                          "tokens": counters["tokens"],
                          "skipped_steps": counters["empty_steps"] + counters["nonfinite_steps"],
                          "dropped_samples": counters["dropped_samples"],
                          **{k: round(v, 6) for k, v in g_metrics.items()}}
                logger.log(record)
            progress.step(last_step, record)
            if last_step == 10:  # fail fast when the first steps already learnt nothing
                check_something_learnt(counters, last_step, out_path)
            if g_stop:
                dist.print(f"\nstopped at step {last_step}: resume with the same command plus --resume")
                save(last_step, stopping=True)
                raise SystemExit(130)
            if args.save_interval and last_step % args.save_interval == 0 and last_step < total_steps:
                save(last_step)
        save(last_step)
    finally:
        stop.restore()
        progress.close()
    if stage.eval_dataset is not None:
        results = evaluate()
        logger.log({"step": last_step, "phase": "after", **results})
        dist.print("held-out after training: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    logger.finish()
    skipped = counters["empty_steps"] + counters["nonfinite_steps"]
    dist.print(f"saved {out_path} ({last_step} steps, {counters['tokens']:,} tokens, {skipped} skipped steps, "
               f"{counters['dropped_samples']} samples dropped as truncated away)")
    return out_path

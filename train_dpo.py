"""Stage 3: DPO preference tuning (https://arxiv.org/abs/2305.18290). Make the chosen answer of each pair more
likely than the rejected one, measured relative to a frozen reference copy of the starting model.

    python train_dpo.py                                         # demo pairs, from out/full_sft_{dim}.pth
    python train_dpo.py --data_path dataset/demo/dpo_identity.jsonl   # the identity lab
    torchrun --nproc_per_node 2 train_dpo.py --n_layers 16 --dim 768 --batch_size 4 --use_wandb
    python train_dpo.py --lora_rank 16 --merge_lora              # LoRA: the reference is the base, no copy

--batch_size counts pairs (each pair is two sequences). Writes {out_dir}/rlhf_{dim}.pth (eval --model_mode 2).
The loss itself is in trainer/losses.py; this file wires data, policy and reference together.
"""
import copy
import hashlib
import os
from functools import partial

import numpy as np
import torch

from dataset.chat import DEFAULT_SYSTEM_PROMPT
from dataset.dpo import DPODataset, collate_pairs
from dataset.packing import model_inputs, per_sequence_sum
from model.lora import BaseModel, adapters_only, load_lora, merge_lora
from trainer.args import add_lora_flags, add_pack_flag, base_parser, model_flags
from trainer.checkpoint import (atomic_save, attach_lora, checkpoint_tokenizer, find_stage_checkpoint, load_model,
                                model_payload, stage_path, unwrap)
from trainer.cli import non_negative_float, positive_float, run_main
from trainer.fsdp import is_sharded, shard_model
from trainer.losses import DPO_LOSS_TYPES, LABEL_SMOOTHING_TYPES, chunked_sequence_logps, dpo_loss, sequence_logps
from trainer.loop import Stage, run_training
from trainer.setup import apply_lora, describe_model, finish, seed_rank, start


def completion_logps(model, batch, autocast):
    """Summed log-probs of each sequence's completion, and the completion lengths, in the order
    [chosen..., rejected...]. Packed (--pack), the sums are taken per packed sequence instead of per row.
    The head runs chunk by chunk (chunked_sequence_logps: the (tokens x vocab) logits never exist whole),
    except for a model sharded with FSDP, whose head weight exists whole only inside its forward."""
    seq_lens = batch.get("seq_lens")        # None: unpacked, one sequence per row
    body = model.model if isinstance(model, BaseModel) else unwrap(model)   # the Transformer itself
    with autocast():
        if is_sharded(body):
            logits = model(batch["input_ids"], **model_inputs(batch))
            logps = sequence_logps(logits, batch["targets"], batch["loss_mask"], seq_lens)
        else:
            hidden = model(batch["input_ids"], **model_inputs(batch), return_hidden=True)
            logps = chunked_sequence_logps(hidden, body.output.weight, batch["targets"],
                                           batch["loss_mask"], seq_lens)
    lengths = batch["loss_mask"].float()
    return logps, per_sequence_sum(lengths, seq_lens) if seq_lens is not None else lengths.sum(-1)


def make_dpo_step(reference, args):
    """The stage's loss function for the shared loop. `reference` is the frozen model, or None when the
    reference log-probs were precomputed and arrive in the batch."""

    def dpo_step(policy, batch, autocast):
        logps, lengths = completion_logps(policy, batch, autocast)
        policy_chosen, policy_rejected = logps.chunk(2)
        chosen_len, rejected_len = lengths.chunk(2)
        if reference is None:
            ref_chosen, ref_rejected = batch["ref_logps"].unbind(-1)
        else:
            with torch.no_grad():  # the reference is never trained: no graph, no gradients
                ref_chosen, ref_rejected = completion_logps(reference, batch, autocast)[0].chunk(2)

        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, args.beta, args.loss_type,
            args.label_smoothing, chosen_len, rejected_len)
        n_pairs = batch["n_pairs"]
        loss_sum = losses.sum()
        # Sums over pairs; the loop divides them by the global number of pairs (TRL's means).
        metrics = {"loss/dpo": losses.detach().sum()}
        if args.sft_weight:
            # RPO-style: + alpha * mean NLL over the chosen completion tokens of this batch. The loop divides
            # by the number of pairs, so the per-batch mean is weighted by the batch's pairs. Logged apart
            # from the DPO part: at step 0 "loss" is ln 2 + alpha * NLL, and loss/dpo is ln 2.
            nll = -policy_chosen.sum() / chosen_len.sum().clamp(min=1)
            loss_sum = loss_sum + args.sft_weight * nll * n_pairs
            metrics["loss/nll"] = nll.detach() * n_pairs
        if n_pairs == 0:  # a dummy pair (everything was truncated away): keep the graph, contribute nothing
            return loss_sum * 0.0, 0, {}
        metrics.update({
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),  # strict >, as in TRL
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen.detach().sum(),
            "logps/rejected": policy_rejected.detach().sum(),
        })
        return loss_sum, n_pairs, metrics

    return dpo_step


def reference_cache_path(args, data, init_from, tokenizer):
    """Cache file for precomputed reference log-probs, keyed by everything they depend on."""
    h = hashlib.sha1()
    for path in data.index.paths + [init_from]:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(tokenizer.json_text.encode())
    h.update(f"{args.max_seq_len}|{args.system_prompt}|{args.dtype}".encode())
    return os.path.join(args.out_dir, "cache", f"ref_logps_{h.hexdigest()[:16]}.pt")


@torch.no_grad()
def precompute_reference(reference, data, args, dist, precision):
    """(len(data), 2) reference log-probs of every pair's chosen and rejected completion. Each rank scores
    its share; rank 0 gathers and saves."""
    mine = list(range(dist.rank, len(data), dist.world_size))
    results = {}
    for start_ in range(0, len(mine), args.batch_size):
        batch = collate_pairs([data[i] for i in mine[start_:start_ + args.batch_size]])
        if batch["n_pairs"] == 0:
            continue
        logps, _ = completion_logps(reference, {k: v.to(dist.device) if torch.is_tensor(v) else v
                                                for k, v in batch.items()}, precision.autocast)
        chosen, rejected = logps.float().cpu().chunk(2)
        for i, c, r in zip(batch["index"].tolist(), chosen.tolist(), rejected.tolist()):
            results[i] = (c, r)
    table = np.zeros((len(data), 2), dtype=np.float32)  # dropped pairs keep 0: they never reach the loss
    for part in dist.all_gather_object(results):
        for i, (c, r) in part.items():
            table[i] = (c, r)
    return table


def main():
    parser = base_parser(__doc__, stage="rlhf", lr=2e-5, epochs=1, batch_size=8, max_seq_len=512,
                         data_path="dataset/demo/dpo_*.jsonl", save_interval=100)
    parser.add_argument("--init_from", default=None,
                        help="the SFT model to start from (default: {out_dir}/full_sft_{dim}.pth for --dim, "
                             "else the only full_sft_*.pth in --out_dir)")
    parser.add_argument("--beta", type=positive_float, default=0.1,
                        help="strength of the pull towards the reference")
    parser.add_argument("--loss_type", default="sigmoid", choices=DPO_LOSS_TYPES, help="see trainer/losses.py")
    parser.add_argument("--label_smoothing", type=float, default=0.0,
                        help=f"assumed label-flip rate in [0, 0.5), for {', '.join(LABEL_SMOOTHING_TYPES)}")
    parser.add_argument("--sft_weight", type=non_negative_float, default=0.0,
                        help="alpha: + alpha * NLL of chosen answers (RPO)")
    parser.add_argument("--precompute_ref", action="store_true",
                        help="score the reference once before training and free it (memory of SFT)")
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="system prompt for conversations that have none ('' for none)")
    add_lora_flags(parser, default_rank=None)
    add_pack_flag(parser)
    parser.add_argument("--merge_lora", action="store_true",
                        help="with --lora_rank: also write the merged model as {out_dir}/{save_name}_{dim}.pth")
    args = parser.parse_args()
    if args.merge_lora and not args.lora_rank:
        parser.error("--merge_lora needs --lora_rank (without LoRA the output is already a full model)")
    if not 0 <= args.label_smoothing < 0.5:
        parser.error("--label_smoothing must be in [0, 0.5)")
    if args.label_smoothing and args.loss_type not in LABEL_SMOOTHING_TYPES:
        parser.error(f"--label_smoothing has no effect with --loss_type {args.loss_type}: use it with "
                     f"{' or '.join(LABEL_SMOOTHING_TYPES)}, or drop it")
    dist, precision = start(args)
    init_from = args.init_from or find_stage_checkpoint(args.out_dir, "full_sft", args.dim)
    flags = {**model_flags(args), "dropout": 0.0}  # dropout off: both models must score deterministically
    model, cfg, ckpt = load_model(init_from, flags)
    tokenizer = checkpoint_tokenizer(ckpt, init_from, args.tokenizer_path)  # the SFT model's tokenizer
    dist.print(f"policy and reference initialised from {init_from}")
    describe_model(model, dist)
    lora = None
    if args.lora_rank:
        # Policy = base + adapters; reference = the same weights with the adapters off: no second model.
        lora = apply_lora(model.to(dist.device), args)
        reference = BaseModel(model)
        dist.print(f"LoRA rank {lora['rank']}: {lora['trainable_parameters']:,} trainable parameters; the "
                   f"reference is the base model (adapters off)")
    else:
        # The reference: a frozen copy of the starting weights. Eval mode, no gradients, never wrapped in DDP.
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(dist.device)
    seed_rank(args, dist)

    data = DPODataset(args.data_path, tokenizer, args.max_seq_len, args.system_prompt or None,
                      args.skip_bad_lines)
    dist.print(f"data: {len(data)} pairs" + (f"; skipped {data.bad_lines} bad lines (first: {data.first_bad})"
                                              if data.bad_lines else ""))
    eval_data = None
    if args.eval_path:  # held-out preference pairs: their DPO loss before and after
        eval_data = DPODataset(args.eval_path, tokenizer, args.max_seq_len, args.system_prompt or None,
                               flag="--eval_path")
    if args.precompute_ref:
        if eval_data is not None:
            eval_data.ref_logps = precompute_reference(reference, eval_data, args, dist, precision)
        cache = reference_cache_path(args, data, init_from, tokenizer)
        if os.path.exists(cache):
            data.ref_logps = torch.load(cache, weights_only=False)
            dist.print(f"reference log-probs from cache {cache}")
        else:
            data.ref_logps = precompute_reference(reference, data, args, dist, precision)
            if dist.is_main:
                atomic_save(data.ref_logps, cache)
            dist.print(f"reference log-probs precomputed -> {cache}")
        del reference  # DPO now needs the memory of SFT: one model, its gradients and optimizer state
        reference = None
        if dist.device.type == "cuda":
            torch.cuda.empty_cache()
    if args.fsdp and reference is not None and not lora:
        shard_model(reference, precision)  # the frozen copy is sharded like the policy: 1/N of it per process
    extra_state = {"dpo": {"beta": args.beta, "loss_type": args.loss_type, "init_from": init_from,
                           "data_path": args.data_path}}
    out_dir = args.out_dir
    if lora:  # the output is the adapters: {out_dir}/lora/{save_name}_{dim}.pth
        args.out_dir = os.path.join(out_dir, "lora")
        extra_state["lora"] = {**lora, "base": init_from}
    stage = Stage(name=args.save_name, dataset=data, collate_fn=partial(collate_pairs, pack=args.pack),
                  loss_fn=make_dpo_step(reference, args), terms_per_step=args.batch_size * args.accumulation_steps,
                  eval_dataset=eval_data, init_from=init_from, extra_state=extra_state,
                  save_weights=adapters_only if lora else None, load_weights=load_lora if lora else None,
                  tokenizer=tokenizer)
    run_training(model, stage, args, dist, precision)
    if lora and args.merge_lora and dist.is_main:
        # Fold the saved adapters into the base weights: a plain model, usable as any stage checkpoint
        # (eval --model_mode 2). Rebuilt from the two files, so it is the same with or without --fsdp.
        adapters = stage_path(args.out_dir, args.save_name, cfg.dim)
        base = load_model(init_from)[0]
        attach_lora(base, adapters)
        payload = torch.load(adapters, weights_only=False)
        merged = stage_path(out_dir, args.save_name, cfg.dim)
        atomic_save({**model_payload(merge_lora(base), args.save_name, payload["step"], tokenizer=tokenizer), "args": payload["args"],
                     "dpo": extra_state["dpo"], "merged_lora": extra_state["lora"]}, merged)
        dist.print(f"merged the adapters into {merged}")
    finish()


if __name__ == "__main__":
    run_main(main)

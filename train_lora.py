"""LoRA fine-tuning (https://arxiv.org/abs/2106.09685): SFT that trains only small low-rank adapters.

    python train_lora.py                          # the LoRA lab: teach the demo SFT model a new name
    python train_lora.py --lora_name lora_medical --data_path lora_medical.jsonl --dim 768
    python eval_model.py --lora_name lora_identity   # chat with the SFT model + these adapters

The base model (default: the SFT checkpoint in --out_dir) is frozen; only the adapters of the chosen linear
layers get gradients and optimizer state (model/lora.py). Data and loss are SFT's: conversations, loss on the
assistant's answers. Writes {out_dir}/lora/{lora_name}_{dim}.pth: the adapters, the LoRA settings, the base
model's config and the path of the base checkpoint. The base checkpoint file is never modified.
"""
import os
from functools import partial

from dataset.chat import DEFAULT_SYSTEM_PROMPT
from dataset.sft import SFTDataset, collate_sft
from model.lora import adapters_only, load_lora
from trainer.args import add_lora_flags, add_pack_flag, base_parser, model_flags
from trainer.checkpoint import checkpoint_tokenizer, find_stage_checkpoint, load_model
from trainer.cli import run_main
from trainer.losses import language_model_loss
from trainer.loop import Stage, run_training
from trainer.setup import apply_lora, describe_model, finish, seed_rank, start


def main():
    parser = base_parser(__doc__, stage="lora", lr=1e-3, epochs=20, batch_size=16, max_seq_len=512,
                         data_path="dataset/demo/lora_identity.jsonl", save_interval=0)
    parser.add_argument("--lora_name", default="lora_identity",
                        help="the adapters are saved as {out_dir}/lora/{lora_name}_{dim}.pth")
    parser.add_argument("--init_from", default=None, help="the base model (default: {out_dir}/full_sft_{dim}.pth "
                        "for --dim, else the only full_sft_*.pth in --out_dir)")
    add_lora_flags(parser, default_rank=16)
    add_pack_flag(parser)
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="system prompt for conversations that have none ('' for none)")
    args = parser.parse_args()
    dist, precision = start(args)
    init_from = args.init_from or find_stage_checkpoint(args.out_dir, "full_sft", args.dim)
    model, cfg, ckpt = load_model(init_from, model_flags(args))
    tokenizer = checkpoint_tokenizer(ckpt, init_from, args.tokenizer_path)  # the base model's tokenizer
    dist.print(f"base model (frozen): {init_from}")
    describe_model(model, dist)
    lora = apply_lora(model, args)
    dist.print(f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g} on {','.join(lora['targets'])}: "
               f"{lora['trainable_parameters']:,} trainable parameters "
               f"({100 * lora['trainable_parameters'] / model.num_parameters():.2f}% of the model)")
    seed_rank(args, dist)

    data = SFTDataset(args.data_path, tokenizer, args.max_seq_len, args.system_prompt or None, args.skip_bad_lines)
    dist.print(f"data: {len(data)} conversations")
    eval_data = None
    if args.eval_path:
        eval_data = SFTDataset(args.eval_path, tokenizer, args.max_seq_len, args.system_prompt or None,
                               flag="--eval_path")
    # Saved as {out_dir}/lora/{lora_name}_{dim}.pth; "model" holds only the adapters.
    args.out_dir, args.save_name = os.path.join(args.out_dir, "lora"), args.lora_name
    stage = Stage(name=args.lora_name, dataset=data, loss_fn=language_model_loss,
                  collate_fn=partial(collate_sft, pack=args.pack),
                  terms_per_step=args.batch_size * args.accumulation_steps * args.max_seq_len / 4,
                  eval_dataset=eval_data, init_from=init_from,
                  save_weights=adapters_only, load_weights=load_lora,
                  extra_state={"lora": {**lora, "base": init_from}}, tokenizer=tokenizer)
    run_training(model, stage, args, dist, precision)
    finish()


if __name__ == "__main__":
    run_main(main)

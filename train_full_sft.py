"""Stage 2: supervised fine-tuning (SFT). Learn to answer in the chat format: the loss covers only the
assistant's answers (and the </s> ending each), never the system prompt or the user's words.

    python train_full_sft.py                                                    # demo data, from pretrain
    torchrun --nproc_per_node 2 train_full_sft.py --data_path sft_512.jsonl --n_layers 16 --dim 768
    torchrun --nproc_per_node 2 train_full_sft.py --data_path sft_1024.jsonl --max_seq_len 1024 \
        --init_from out/full_sft_768.pth                                        # SFT-1024 after SFT-512
    python train_full_sft.py --show_sample                                      # see what is supervised

Starts from {out_dir}/pretrain_{dim}.pth (or --init_from any stage output); the model config comes from that
checkpoint. Writes {out_dir}/full_sft_{dim}.pth.
"""
from functools import partial

from dataset.chat import DEFAULT_SYSTEM_PROMPT, show_sample
from dataset.sft import SFTDataset, collate_sft
from model.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from trainer.args import add_pack_flag, base_parser, model_flags
from trainer.checkpoint import checkpoint_tokenizer, find_stage_checkpoint, load_model, read_checkpoint
from trainer.cli import UserError, run_main
from trainer.losses import language_model_loss
from trainer.loop import Stage, run_training
from trainer.setup import describe_model, finish, seed_rank, start


def show_first_sample(args):
    """Print the first conversation as the model will see it: with the tokenizer of the checkpoint SFT starts
    from, or before any pretraining, with --tokenizer_path (default: the bundled one)."""
    try:
        init_from = args.init_from or find_stage_checkpoint(args.out_dir, "pretrain", args.dim)
    except UserError:  # no pretrained model yet
        init_from = None
    tokenizer = (checkpoint_tokenizer(read_checkpoint(init_from), init_from, args.tokenizer_path) if init_from
                 else Tokenizer(args.tokenizer_path or DEFAULT_TOKENIZER))
    data = SFTDataset(args.data_path, tokenizer, args.max_seq_len, args.system_prompt or None, args.skip_bad_lines)
    ids, mask = data.render(0)
    print(show_sample(tokenizer, ids, mask))
    print(f"\n{len(ids)} tokens, {sum(mask)} supervised (green, in [[ ]])")


def main():
    parser = base_parser(__doc__, stage="full_sft", lr=5e-5, epochs=2, batch_size=16, max_seq_len=512,
                         data_path="dataset/demo/sft_*.jsonl")
    parser.add_argument("--init_from", default=None, help="checkpoint to start from (default: {out_dir}/"
                        "pretrain_{dim}.pth for --dim, else the only pretrain_*.pth in --out_dir)")
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT,
                        help="system prompt for conversations that have none ('' for none)")
    parser.add_argument("--show_sample", action="store_true", help="print one rendered sample and exit")
    add_pack_flag(parser)
    args = parser.parse_args()
    if args.show_sample:
        show_first_sample(args)
        return

    dist, precision = start(args)
    init_from = args.init_from or find_stage_checkpoint(args.out_dir, "pretrain", args.dim)
    model, cfg, ckpt = load_model(init_from, model_flags(args))
    tokenizer = checkpoint_tokenizer(ckpt, init_from, args.tokenizer_path)  # the pretraining's tokenizer
    dist.print(f"initialised from {init_from}")
    data = SFTDataset(args.data_path, tokenizer, args.max_seq_len, args.system_prompt or None, args.skip_bad_lines)
    describe_model(model, dist)
    seed_rank(args, dist)
    dist.print(f"data: {len(data)} conversations" + (f"; skipped {data.bad_lines} bad lines "
               f"(first: {data.first_bad})" if data.bad_lines else ""))
    eval_data = None
    if args.eval_path:  # held-out conversations: their answer loss before and after
        eval_data = SFTDataset(args.eval_path, tokenizer, args.max_seq_len, args.system_prompt or None,
                               flag="--eval_path")
    stage = Stage(name=args.save_name, dataset=data, loss_fn=language_model_loss,
                  collate_fn=partial(collate_sft, pack=args.pack),
                  terms_per_step=args.batch_size * args.accumulation_steps * args.max_seq_len / 4,
                  eval_dataset=eval_data, init_from=init_from, tokenizer=tokenizer)
    run_training(model, stage, args, dist, precision)
    finish()


if __name__ == "__main__":
    run_main(main)

"""Stage 1: pretraining. Learn to continue text by predicting every next token of the corpus.

    python train_pretrain.py                                             # bundled demo corpus, small model
    torchrun --nproc_per_node 2 train_pretrain.py --data_path pretrain_hq.jsonl --n_layers 16 --dim 768

Writes {out_dir}/pretrain_{dim}.pth (weights + config), its _resume.pth and a _log.jsonl of metrics.
"""
import os

from dataset.pretrain import PretrainDataset, collate_blocks
from model import ModelConfig, Transformer
from model.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from trainer.args import base_parser, model_flags
from trainer.cli import run_main
from trainer.losses import language_model_loss
from trainer.loop import Stage, run_training
from trainer.setup import describe_model, finish, seed_rank, start


def main():
    parser = base_parser(__doc__, stage="pretrain", lr=5e-4, epochs=1, batch_size=32, max_seq_len=512,
                         data_path="dataset/demo/pretrain_*.jsonl", warmup_iters=100)
    parser.add_argument("--cache_dir", default=None, help="token cache (default: {out_dir}/cache)")
    args = parser.parse_args()
    dist, precision = start(args)
    tokenizer = Tokenizer(args.tokenizer_path or DEFAULT_TOKENIZER)
    flags = {k: v for k, v in model_flags(args).items() if v is not None}
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **flags)
    model = Transformer(cfg)
    describe_model(model, dist)
    seed_rank(args, dist)

    cache_dir = args.cache_dir or os.path.join(args.out_dir, "cache")
    data = PretrainDataset(args.data_path, tokenizer, args.max_seq_len, cache_dir, dist, args.skip_bad_lines)
    dist.print(f"data: {len(data.paths)} file(s), {data.total_tokens:,} tokens in {len(data)} blocks of "
               f"{args.max_seq_len}" + (f"; skipped {data.bad_lines} bad lines" if data.bad_lines else ""))
    eval_data = None
    if args.eval_path:  # held-out text: its loss before and after
        eval_data = PretrainDataset(args.eval_path, tokenizer, args.max_seq_len, cache_dir, dist,
                                    flag="--eval_path")
    stage = Stage(name=args.save_name, dataset=data, collate_fn=collate_blocks, loss_fn=language_model_loss,
                  terms_per_step=args.batch_size * args.max_seq_len * args.accumulation_steps,
                  eval_dataset=eval_data, tokenizer=tokenizer)
    run_training(model, stage, args, dist, precision)
    finish()


if __name__ == "__main__":
    run_main(main)

"""Which trained model to talk to, and loading it: shared by eval_model.py (the terminal) and
scripts/serve_openai_api.py (the OpenAI-compatible server), so that both pick and load checkpoints alike."""
import os
from dataclasses import dataclass

from model import Transformer
from model.tokenizer import BOS_ID, Tokenizer
from trainer.checkpoint import attach_lora, checkpoint_tokenizer, find_stage_checkpoint, load_model
from trainer.distributed import pick_device

MODES = {0: "pretrain", 1: "full_sft", 2: "rlhf"}


def add_model_args(ap):
    """The flags that choose the checkpoint (--checkpoint, or --out_dir + --model_mode [+ --dim]), the
    tokenizer, the device and LoRA adapters."""
    ap.add_argument("--model_mode", type=int, default=1, choices=sorted(MODES),
                    help="0: pretrain (continues text), 1: full_sft, 2: rlhf (DPO)")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint path (overrides --model_mode)")
    ap.add_argument("--out_dir", default="out", help="where --model_mode finds {stage}_{dim}.pth")
    ap.add_argument("--dim", type=int, default=None, help="picks {stage}_{dim}.pth; checked against the checkpoint")
    ap.add_argument("--n_layers", type=int, default=None, help="checked against the checkpoint")
    ap.add_argument("--tokenizer_path", default=None,
                    help="tokenizer.json (default: the checkpoint's, and another is refused; checkpoints without "
                         "one: the bundled model/tokenizer/tokenizer.json)")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    ap.add_argument("--lora_name", default=None,
                    help="add the LoRA adapters {out_dir}/lora/{lora_name}_{dim}.pth (train_lora.py) to the model")


@dataclass
class ChatModel:
    model: Transformer      # on its device, in eval mode
    path: str               # the checkpoint it was loaded from
    ckpt: dict              # the checkpoint's contents (stage, step, config, ...)
    tokenizer: Tokenizer
    chat: bool              # True: answers chat-template conversations; False: continues raw text (pretrain)
    device: object
    lora_path: str = None
    lora: dict = None       # the adapters' settings, when --lora_name added some

    @property
    def name(self):
        """The model's id for clients (OpenAI's `model` field): the file name without .pth."""
        return os.path.splitext(os.path.basename(self.path))[0]


def load_chat_model(args):
    """Find and load the model the flags of add_model_args name."""
    device = pick_device(args.device, 0, 1)
    path = args.checkpoint or find_stage_checkpoint(args.out_dir, MODES[args.model_mode], args.dim,
                                                    flag="--checkpoint")
    model, cfg, ckpt = load_model(path, {"dim": args.dim, "n_layers": args.n_layers})
    lora_path = lora = None
    if args.lora_name:
        lora_path = os.path.join(args.out_dir, "lora", f"{args.lora_name}_{cfg.dim}.pth")
        lora = attach_lora(model, lora_path)
    model.to(device).eval()
    # The tokenizer the model was trained with, carried by the checkpoint (older ones: the bundled default).
    tokenizer = checkpoint_tokenizer(ckpt, path, args.tokenizer_path)
    # Mode 0 (or a pretraining checkpoint) continues raw text: a pretrained model has never seen the template.
    chat = ckpt.get("stage") != "pretrain" if args.checkpoint else args.model_mode != 0
    return ChatModel(model, path, ckpt, tokenizer, chat, device, lora_path, lora)


def text_prompt(tokenizer, text):
    """The ids a pretrained model continues: <s> and the text, no chat template."""
    return [BOS_ID] + tokenizer.encode(text)

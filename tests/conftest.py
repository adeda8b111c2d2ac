import os
import signal
import sys

# Tests import the project's packages (model, dataset, trainer) from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "offline")
# A suite started in the background by a non-interactive shell (`cmd &`, nohup, some CI runners) inherits
# SIGINT *ignored*, and so would every program it starts: the Ctrl-C tests would then test nothing. Put the
# default back; a handler (unlike an ignore) is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory):
    """out_dir holding a tiny pretrained model (pretrain_64.pth), trained once per test session."""
    from tests.helpers import TINY, run_script
    out = tmp_path_factory.mktemp("pretrained")
    run_script("train_pretrain.py", *TINY, "--max_seq_len", "128", "--batch_size", "16", "--max_steps", "60",
               "--learning_rate", "3e-3", "--warmup_iters", "5", "--out_dir", out, "--no_progress", "--device", "cpu")
    return out


@pytest.fixture(scope="session")
def tiny_sft(tiny_pretrained, tmp_path_factory):
    """out_dir holding the tiny pretrained model and a tiny SFT model (full_sft_64.pth) made from it."""
    import shutil
    from tests.helpers import run_script
    out = tmp_path_factory.mktemp("sft")
    shutil.copy(tiny_pretrained / "pretrain_64.pth", out / "pretrain_64.pth")
    run_script("train_full_sft.py", "--dim", "64", "--max_seq_len", "128", "--batch_size", "16", "--max_steps", "40",
               "--learning_rate", "2e-3", "--out_dir", out, "--no_progress", "--device", "cpu")
    return out

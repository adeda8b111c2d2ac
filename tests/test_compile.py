"""--compile on CPU (torch.compile with the inductor backend, which needs a C++ compiler): a few pretraining
steps give the losses of the eager model. Slow (the compilation takes tens of seconds), so one small run."""
import shutil

import pytest

from tests.helpers import TINY, read_log, run_script


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_pretraining_matches_eager(tmp_path):
    losses = {}
    for flags in ((), ("--compile",)):
        out = tmp_path / ("compiled" if flags else "eager")
        proc = run_script("train_pretrain.py", *TINY, "--max_seq_len", "64", "--batch_size", "4", "--max_steps", "3",
                   "--learning_rate", "1e-3", "--log_interval", "1", "--save_interval", "0", "--out_dir", out,
                   "--no_progress", "--device", "cpu", *flags)
        assert ("the first step compiles the model" in proc.stdout) == bool(flags)
        losses[bool(flags)] = [r["loss"] for r in read_log(out / "pretrain_64_log.jsonl")]
    assert len(losses[True]) == len(losses[False]) == 3
    for eager, compiled in zip(losses[False], losses[True]):
        # Inductor fuses and reorders the float32 element-wise work: equal to rounding, not bit-identical.
        assert abs(eager - compiled) < 1e-4, (losses[False], losses[True])

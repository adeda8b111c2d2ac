"""trainer/setup.py keep_freed_cpu_memory: a training step's freed tensors leave their pages to the next
step's, instead of handing them back to the OS to be faulted in again. Counted in minor page faults (one per
new 4 KiB page touched) over steady-state steps of a fresh process: with glibc's defaults, then after the call.
The probe turns transparent huge pages off for itself: where the kernel maps all memory with them
(/sys/kernel/mm/transparent_hugepage/enabled = always) one fault maps 2 MiB. A CI machine counted 405 faults
per step with glibc's defaults instead of 4,400-13,000, which huge pages explain: simulated here with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, 12-17 per step; with the probe's prctl as well, 4,450-12,800.
The probe reports the median of 5 steps: a CI run once counted 6,400 faults in one of 3 steps with the freed
memory kept (a 26 MB logits chunk landing on a fresh block once, its average 2,133 failing the check)."""
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS_PER_STEP = """
import ctypes, resource, sys
PR_SET_THP_DISABLE = 41                           # linux/prctl.h: this process gets 4 KiB pages only
assert ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
import torch
from model import ModelConfig, Transformer
from trainer.losses import chunked_next_token_loss
from trainer.setup import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
torch.manual_seed(0)
model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256))
optimizer = torch.optim.AdamW(model.parameters())
x = torch.randint(0, 6400, (4, 257))              # 1,024 tokens: one chunk of the head
def step():
    loss, n = chunked_next_token_loss(model(x[:, :-1], return_hidden=True), model.output.weight, x[:, 1:])
    (loss / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
step(); step()                                    # the first steps allocate everything for the first time
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[2])                          # the median step: one late first-time block can't move it
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_training_steps_reuse_freed_memory():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["OMP_NUM_THREADS"] = "1"
    runs = {mode: subprocess.Popen([sys.executable, "-c", FAULTS_PER_STEP, mode], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, text=True) for mode in ("default", "keep")}
    faults = {mode: float(run.communicate()[0]) for mode, run in runs.items()}   # the two run side by side
    # Measured: 4,400-13,000 per step with glibc's defaults (a chunk of logits alone is 6,400 pages), 0-1 kept.
    assert faults["default"] > 1000, faults
    assert faults["keep"] < 100, faults


def test_user_malloc_settings_are_left_alone(monkeypatch):
    from trainer.setup import keep_freed_cpu_memory
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_cpu_memory() is False

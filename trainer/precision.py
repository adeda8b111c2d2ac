"""Numerical precision, explicit: which dtype the matmuls run in, and whether a GradScaler is needed.

Weights and optimizer state always stay float32 ("master weights"). With --dtype bfloat16/float16 the forward
and backward run under torch.autocast in that dtype. float16's narrow range makes small gradients underflow,
so it needs loss scaling (GradScaler); bfloat16 has float32's range and needs none."""
import contextlib
import platform
from dataclasses import dataclass

import torch

from trainer.cli import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Precision:
    name: str
    dtype: torch.dtype
    device_type: str

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    def describe(self):
        if self.dtype == torch.float32:
            return "float32 (TF32 matmuls)" if self.device_type == "cuda" else "float32"
        scaler = ", GradScaler on" if self.dtype == torch.float16 else ""
        emulated = (" (this CPU has no bfloat16 instructions: expect it to be slower than float32)"
                    if self.device_type == "cpu" and cpu_has_bfloat16() is False else "")
        return f"autocast {self.name} on {self.device_type}, float32 master weights{scaler}{emulated}"


def cpu_has_bfloat16():
    """Whether this x86 CPU multiplies bfloat16 natively (AVX512-BF16, or Intel's AMX tiles). Without them the
    bfloat16 matmuls take a slower path, and a bfloat16 step was slower than a float32 one (on an AVX2 EPYC).
    None on other CPUs (ARM has bfloat16 extensions of its own, not checked here)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def setup_precision(dtype_arg, device):
    """--dtype float32|bfloat16|float16, or None for the default: bfloat16 on a GPU that supports it, float32
    otherwise. On a CPU float32 stays the default even where bfloat16 is native (AVX512-BF16, AMX): there it made
    pretraining-shaped steps faster (bench/compare.py on an AVX512-BF16 EPYC: 1.23x at dim 128, 1.83x at 26M,
    1.86x at 104M parameters) but the demo's packed SFT steps 1.3-1.5x slower (mostly new matmul shapes: a
    packed row has a new length every step; docs/speed.md, "bfloat16 on a CPU that has it"), and float32 gives the
    same numbers on every CPU."""
    if device.type == "cuda":
        # TF32 tensor cores for the float32 matmuls that remain (10-bit mantissa, float32's range): free speed on
        # Ampere and later. "high" is the documented switch (torch.set_float32_matmul_precision).
        torch.set_float32_matmul_precision("high")
    if dtype_arg is None:
        dtype_arg = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype_arg not in DTYPES:
        raise UserError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype_arg!r}")
    if dtype_arg == "float16" and device.type != "cuda":
        raise UserError(f"--dtype float16 needs a CUDA device (this run is on {device.type}); "
                        "use --dtype bfloat16 or float32")
    if dtype_arg == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--dtype bfloat16: this GPU has no bfloat16 support; use --dtype float16 (with loss "
                        "scaling) or float32")
    return Precision(dtype_arg, DTYPES[dtype_arg], device.type)

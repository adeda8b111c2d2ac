"""Numerical precision, explicit: which dtype the matmuls run in, and whether a GradScaler is needed.

Weights and optimizer state always stay float32 ("master weights"). With --dtype bfloat16/float16 the forward
and backward run under torch.autocast in that dtype. float16's narrow range makes small gradients underflow,
so it needs loss scaling (GradScaler); bfloat16 has float32's range and needs none."""
import contextlib
from dataclasses import dataclass

import torch

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
            tf32 = " (TF32 matmuls)" if self.device_type == "cuda" else ""
            return f"float32{tf32}"
        scaler = ", GradScaler on" if self.dtype == torch.float16 else ""
        return f"autocast {self.name} on {self.device_type}, float32 master weights{scaler}"


def setup_precision(dtype_arg, device):
    """--dtype float32|bfloat16|float16, or None for the best default: bfloat16 on a GPU that supports it,
    float32 otherwise (CPU autocast is slower than float32 for small models)."""
    if device.type == "cuda":
        # TF32 tensor cores for any float32 matmul left (10-bit mantissa, same range): free speed on Ampere+.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype_arg is None:
        dtype_arg = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype_arg not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype_arg!r}")
    if dtype_arg == "float16" and device.type != "cuda":
        raise ValueError("--dtype float16 needs a CUDA device; use bfloat16 or float32 on CPU")
    return Precision(dtype_arg, DTYPES[dtype_arg], device.type)

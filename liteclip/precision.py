"""Which number format the forward pass runs in: an autocast dtype chosen for the hardware, or fp32.

Used by training and by batched encoding; the weights always stay fp32 (autocast casts activations, not weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    """How the forward pass runs: an autocast dtype (or None for fp32) and whether fp16 needs a gradient scaler."""

    dtype: torch.dtype | None
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16  # fp16's narrow range underflows small gradients without one


def cpu_has_native_bf16() -> bool:
    """AMX bf16 tiles (Intel Xeons since Sapphire Rapids). Other CPUs emulate much of bf16: they stay in fp32."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(amx and avx512_bf16 and amx() and avx512_bf16())


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """auto: bf16 where the hardware has it (CUDA, AMX CPUs), fp16 (with a scaler) on older GPUs, else fp32."""
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_has_native_bf16():
            choice = "bf16"  # 1.4x on a convnext_tiny step on a 2-core AMX Xeon (benchmarks/image_tower.py)
        else:
            choice = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return Precision(dtype, device.type)

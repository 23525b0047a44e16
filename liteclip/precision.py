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


# CPU features under which bf16 matmul and convolution run natively in oneDNN, fast enough that training in bf16
# autocast beats fp32 (measured, 2 cores each, torch 2.14.1):
#   avx512_bf16 without AMX   AMD EPYC Zen 4: 2048^2 matmul 182 vs 65 GFLOP/s (2.8x); resnet18 64 px step 1.55x
#   amx_tile + avx512_bf16    Intel Xeon (Sapphire Rapids on): convnext_tiny 224 px step 1.40x
#   neither (AVX2, AVX-512F)  bf16 is emulated by conversions around fp32 kernels: slower than fp32, so fp32
BF16_CPU_FEATURES = {"amx": "AMX tiles", "avx512_bf16": "AVX-512 BF16"}


def cpu_bf16_feature() -> str | None:
    """The feature that makes bf16 native on this CPU ("amx" or "avx512_bf16", see BF16_CPU_FEATURES), or None."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if avx512_bf16 is None or not avx512_bf16():
        return None
    return "amx" if amx is not None and amx() else "avx512_bf16"


def cpu_has_native_bf16() -> bool:
    """Whether bf16 autocast is faster than fp32 on this CPU: AVX-512 BF16, with or without AMX."""
    return cpu_bf16_feature() is not None


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """auto: bf16 where the hardware has it (CUDA with bf16; CPUs with AVX-512 BF16 or AMX), fp16 (with a scaler) on
    older GPUs, else fp32."""
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_has_native_bf16():
            choice = "bf16"  # see BF16_CPU_FEATURES for what it gains on each kind
        else:
            choice = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return Precision(dtype, device.type)

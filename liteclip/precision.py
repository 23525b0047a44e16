"""Which number format the forward pass runs in: an autocast dtype chosen for the hardware, or fp32.

Used by training and by batched encoding; the weights always stay fp32 (autocast casts activations, not weights).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


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
    def name(self) -> str:
        """"bf16", "fp16" or "fp32": what resolve_precision takes to make this precision again."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16  # fp16's narrow range underflows small gradients without one


# Whether bf16 autocast trains faster than fp32 on a CPU depends on two things: bf16 instructions (without AVX-512
# BF16 or AMX, bf16 is emulated by conversions around fp32 kernels and is always slower) and how fast the same
# machine already is in fp32, which differs by vendor and core. With AMX tiles bf16 wins by a wide margin; with
# AVX-512 BF16 alone it wins on some chips (AMD Zen 4, whose fp32 is slow) and loses on others (an Intel core, whose
# fp32 is fast); `python -m benchmarks.kernels` measures a machine, and benchmarks/README.md keeps the figures.
# So `auto` takes bf16 with AMX, fp32 without bf16 instructions, and in between (AVX-512 BF16 alone, or AMX that
# oneDNN is told not to use) times the matmul in both formats and takes bf16 from BF16_MIN_SPEEDUP. A whole step gains
# less than the matmul (it also runs elementwise work and memory traffic that bf16 barely speeds up), hence the margin.
BF16_CPU_FEATURES = {"amx": "AMX tiles", "avx512_bf16": "AVX-512 BF16"}
BF16_MIN_SPEEDUP = 1.5
ONEDNN_ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN's own switch: may turn AMX off


def cpu_bf16_feature() -> str | None:
    """The feature that makes bf16 native on this CPU ("amx" or "avx512_bf16", see BF16_CPU_FEATURES), or None."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if avx512_bf16 is None or not avx512_bf16():
        return None
    return "amx" if amx is not None and amx() else "avx512_bf16"


def onednn_isa_limit() -> str | None:
    """"ONEDNN_MAX_CPU_ISA=..." when the environment holds oneDNN below what the CPU has, else None."""
    return next((f"{name}={os.environ[name]}" for name in ONEDNN_ISA_LIMITS if os.environ.get(name)), None)


@dataclass(frozen=True)
class Bf16Measurement:
    """One matmul timed in bf16 and in fp32 on this CPU, with the current thread count."""

    bf16_gflops: float
    fp32_gflops: float
    seconds: float  # what the measurement itself took

    @property
    def speedup(self) -> float:
        return self.bf16_gflops / self.fp32_gflops


@functools.lru_cache(maxsize=1)
def measure_cpu_bf16(rows: int = 512, width: int = 1024, repeats: int = 9) -> Bf16Measurement:
    """Times a (rows x width) @ (width x width) matmul in bf16 and in fp32, best of `repeats` after one warm-up
    each (the best is what the hardware does when nothing interrupts it). The two formats take turns, so another
    process busy for a moment slows both alike and cannot tip the choice one way in one run and the other way in the
    next. A fraction of a second, once per process."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(rows, width, generator=generator), torch.randn(width, width, generator=generator)
    operands = {dtype: (left.to(dtype), right.to(dtype)) for dtype in (torch.bfloat16, torch.float32)}
    best = {dtype: math.inf for dtype in operands}
    for a, b in operands.values():
        torch.mm(a, b)  # warm-up: kernel selection and first-touch memory
    for _ in range(repeats):
        for dtype, (a, b) in operands.items():
            tick = time.perf_counter()
            torch.mm(a, b)
            best[dtype] = min(best[dtype], time.perf_counter() - tick)
    gflops = {dtype: 2 * rows * width * width / seconds / 1e9 for dtype, seconds in best.items()}
    return Bf16Measurement(gflops[torch.bfloat16], gflops[torch.float32], time.perf_counter() - start)


def cpu_bf16_is_measured() -> bool:
    """Whether auto decides by timing on this CPU: AVX-512 BF16 without AMX, or AMX that oneDNN is told not to use.
    Elsewhere the CPU's features decide, the same way every time."""
    feature = cpu_bf16_feature()
    return feature == "avx512_bf16" or (feature == "amx" and onednn_isa_limit() is not None)


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 autocast trains faster than fp32 on this CPU: with AMX, yes; without bf16 instructions, no; with
    AVX-512 BF16 alone, when a matmul measures at least BF16_MIN_SPEEDUP faster in bf16 (see BF16_CPU_FEATURES)."""
    feature = cpu_bf16_feature()
    if not cpu_bf16_is_measured():
        return feature is not None  # AMX with oneDNN free to use it: yes; no bf16 instructions: no
    isa_limit = onednn_isa_limit()
    measured = measure_cpu_bf16()
    faster = measured.speedup >= BF16_MIN_SPEEDUP
    logger.info("precision auto on this CPU (%s%s): bf16 matmul %.0f GFLOP/s against %.0f in fp32 (%.2fx, measured "
                "in %.2f s): %s", BF16_CPU_FEATURES[feature], f", {isa_limit}" if isa_limit else "",
                measured.bf16_gflops, measured.fp32_gflops, measured.speedup, measured.seconds,
                "bf16" if faster else f"fp32, as bf16 is taken from {BF16_MIN_SPEEDUP}x")
    return faster


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """auto: bf16 where the hardware has it (CUDA with bf16; CPUs where bf16 measures faster, cpu_bf16_is_faster),
    fp16 (with a scaler) on older GPUs, else fp32."""
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_bf16_is_faster():
            choice = "bf16"  # see BF16_CPU_FEATURES for what it gains on each kind
        else:
            choice = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return Precision(dtype, device.type)

"""Choosing the autocast dtype for the hardware."""

import math
from pathlib import Path

import pytest
import torch

from liteclip import precision


def measured(speedup: float) -> precision.Bf16Measurement:
    return precision.Bf16Measurement(bf16_gflops=100.0 * speedup, fp32_gflops=100.0, seconds=0.1)


def not_measured():
    raise AssertionError("the matmul was timed where the CPU's features decide")


@pytest.mark.parametrize("amx, avx512_bf16, isa_limit, matmul_speedup, expected", [
    (True, True, None, None, torch.bfloat16),   # Intel Xeon, Sapphire Rapids on: known, nothing timed
    (False, True, None, 2.8, torch.bfloat16),   # AMD EPYC Zen 4: AVX-512 BF16 without AMX, slow fp32
    (False, True, None, 0.62, None),            # an Intel CPU with AVX-512 BF16 but no AMX: fast fp32, slower bf16
    (False, True, None, 1.2, None),             # bf16 instructions, but a gain too small to be worth it
    (True, True, "AVX512_CORE_BF16", 0.62, None),  # AMX present but oneDNN told not to use it: timed
    (False, False, None, None, None),           # AVX2 or plain AVX-512: bf16 would be emulated, nothing timed
], ids=["xeon-amx", "zen4-avx512bf16", "intel-avx512bf16-no-amx", "small-gain", "amx-held-back", "avx2"])
def test_auto_precision_on_the_cpu_follows_the_bf16_capability(monkeypatch, amx, avx512_bf16, isa_limit,
                                                                matmul_speedup, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(precision, "measure_cpu_bf16",
                        not_measured if matmul_speedup is None else lambda: measured(matmul_speedup))
    for name in precision.ONEDNN_ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    if isa_limit:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_limit)
    assert precision.resolve_precision("auto", torch.device("cpu")).dtype == expected
    assert precision.cpu_bf16_feature() == ("amx" if amx else "avx512_bf16" if avx512_bf16 else None)
    assert precision.resolve_precision("auto", torch.device("mps")).dtype is None
    assert precision.resolve_precision("fp32", torch.device("cpu")).dtype is None
    assert precision.resolve_precision("bf16", torch.device("cpu")).dtype == torch.bfloat16


def test_the_bf16_measurement_times_both_formats_once_per_process():
    first = precision.measure_cpu_bf16()
    assert first.bf16_gflops > 0 and first.fp32_gflops > 0 and math.isfinite(first.speedup)
    assert first.speedup == pytest.approx(first.bf16_gflops / first.fp32_gflops)
    assert precision.measure_cpu_bf16() is first  # cached: a second resolve_precision costs nothing


def test_the_bf16_probe_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():  # not Linux: the probe must still answer
        assert precision.cpu_bf16_feature() in (None, "amx", "avx512_bf16")
        return
    flags = set(cpuinfo.read_text().split())
    expected = None if "avx512_bf16" not in flags else "amx" if "amx_tile" in flags else "avx512_bf16"
    assert precision.cpu_bf16_feature() == expected


def test_only_fp16_needs_a_gradient_scaler():
    assert precision.resolve_precision("fp16", torch.device("cpu")).needs_grad_scaler
    assert not precision.resolve_precision("bf16", torch.device("cpu")).needs_grad_scaler
    assert not precision.resolve_precision("fp32", torch.device("cpu")).needs_grad_scaler

"""Choosing the autocast dtype for the hardware."""

from pathlib import Path

import pytest
import torch

from liteclip import precision


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, True, torch.bfloat16),   # Intel Xeon, Sapphire Rapids on
    (False, True, torch.bfloat16),  # AMD EPYC Zen 4: AVX-512 BF16 without AMX
    (False, False, None),           # AVX2 or plain AVX-512: bf16 would be emulated
], ids=["xeon-amx", "zen4-avx512bf16", "avx2"])
def test_auto_precision_on_the_cpu_follows_the_bf16_capability(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert precision.resolve_precision("auto", torch.device("cpu")).dtype == expected
    assert precision.cpu_bf16_feature() == ("amx" if amx else "avx512_bf16" if avx512_bf16 else None)
    assert precision.resolve_precision("auto", torch.device("mps")).dtype is None
    assert precision.resolve_precision("fp32", torch.device("cpu")).dtype is None
    assert precision.resolve_precision("bf16", torch.device("cpu")).dtype == torch.bfloat16


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

"""Choosing the autocast dtype for the hardware."""

from pathlib import Path

import pytest
import torch

from liteclip import precision


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_the_cpu_is_bf16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve_precision("auto", torch.device("cpu")).dtype == expected
    assert precision.resolve_precision("auto", torch.device("mps")).dtype is None
    assert precision.resolve_precision("fp32", torch.device("cpu")).dtype is None
    assert precision.resolve_precision("bf16", torch.device("cpu")).dtype == torch.bfloat16


def test_the_native_bf16_probe_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():  # not Linux: the probe must still answer
        assert isinstance(precision.cpu_has_native_bf16(), bool)
        return
    flags = set(cpuinfo.read_text().split())
    assert precision.cpu_has_native_bf16() == ({"amx_tile", "avx512_bf16"} <= flags)


def test_only_fp16_needs_a_gradient_scaler():
    assert precision.resolve_precision("fp16", torch.device("cpu")).needs_grad_scaler
    assert not precision.resolve_precision("bf16", torch.device("cpu")).needs_grad_scaler
    assert not precision.resolve_precision("fp32", torch.device("cpu")).needs_grad_scaler

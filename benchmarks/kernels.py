"""What this CPU's kernels reach: its fp32 peaks, the limit every fp32 training step is measured against, and
whether bf16 pays here (the measurement `train.precision: auto` takes where the CPU's features leave it open, beside
what training runs: a transformer MLP block and a 3x3 convolution, forward and backward, in bf16 autocast and fp32).

    python -m benchmarks.kernels
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python -m benchmarks.kernels   # an AMX Xeon as a CPU without AMX
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.kernels   # ... as an AVX2-only CPU

Each figure is the best of --repeats after two warm-ups (what the hardware does when nothing interrupts it). Prints
the CPU's model name and bf16 features, the fp32 peaks (`fp32_matmul_gflops=`, `fp32_conv_gflops=`: a 2048-square
matrix product, and a wide 3x3 convolution forward, channels_last), then one line per workload with both times and
`speedup=` (fp32 time over bf16 time), then auto's choice, as its last line `auto_precision=<bf16|fp32>`.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.image_tower import matmul_peak_tflops, timed
from liteclip.precision import (BF16_CPU_FEATURES, cpu_bf16_feature, measure_cpu_bf16, onednn_isa_limit,
                                resolve_precision)


def training_pass(module: nn.Module, inputs: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """One forward and backward through `module`, in bf16 autocast or in fp32, as the training step runs it."""
    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = module(inputs)
        outputs.float().sum().backward()
    return run


def workloads(scale: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """A bert-mini-sized MLP block over a batch of tokens, and a ResNet stage's 3x3 convolution (channels_last)."""
    width = 256
    mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
    conv = nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    pixels = torch.randn(2 * scale, 64, 32, 32).to(memory_format=torch.channels_last)
    return {f"MLP block, {160 * scale} tokens x {width}": (mlp, torch.randn(160 * scale, width)),
            f"3x3 conv, {2 * scale}x64x32x32": (conv, pixels)}


def fp32_peaks(repeats: int = 3) -> dict[str, float]:
    """GFLOP/s this CPU reaches in fp32 on the two kernels training spends its time in, at sizes large enough to run
    at full rate: a 2048-square matrix product, and a 3x3 convolution forward, 128 to 128 channels at 32x32 over a
    batch of 32, channels_last (2 FLOPs per multiply-add, as FlopCounterMode counts)."""
    cpu = torch.device("cpu")
    conv = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    pixels = torch.randn(32, 128, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        seconds = timed(lambda: conv(pixels), cpu, repeats)
    conv_flops = 2 * 32 * 32 * 32 * 128 * 128 * 9
    return {"matmul": matmul_peak_tflops(cpu, torch.float32) * 1e3, "conv": conv_flops / seconds / 1e9}


def cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=4, help="batch multiplier for the MLP and conv workloads")
    args = parser.parse_args()
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    feature = cpu_bf16_feature()
    limit = onednn_isa_limit()
    print(f"CPU: {cpu_model_name()}; bf16 instructions: {BF16_CPU_FEATURES.get(feature, 'none')}"
          f"{f' (oneDNN held back: {limit})' if limit else ''}; threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    peaks = fp32_peaks(args.repeats)
    print(f"fp32_matmul_gflops={peaks['matmul']:.0f}")
    print(f"fp32_conv_gflops={peaks['conv']:.0f}")
    matmul = measure_cpu_bf16.__wrapped__(repeats=args.repeats)  # a fresh measurement, not the cached one
    print(f"matmul 512x1024 @ 1024x1024 (what auto times): bf16 {matmul.bf16_gflops:.0f} GFLOP/s, fp32 "
          f"{matmul.fp32_gflops:.0f} GFLOP/s, measured in {matmul.seconds:.2f} s: speedup={matmul.speedup:.2f}")
    for name, (module, inputs) in workloads(args.scale).items():
        bf16, fp32 = (timed(training_pass(module, inputs, flag), cpu, args.repeats) for flag in (True, False))
        print(f"{name}, forward + backward: bf16 {bf16 * 1e3:.1f} ms, fp32 {fp32 * 1e3:.1f} ms: "
              f"speedup={fp32 / bf16:.2f}")
    chosen = resolve_precision("auto", cpu).dtype
    print(f"auto_precision={'bf16' if chosen == torch.bfloat16 else 'fp32'}")


if __name__ == "__main__":
    main()

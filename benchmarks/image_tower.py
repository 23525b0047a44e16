"""Image-tower throughput and the fraction of the hardware's peak it reaches, as liteclip runs the tower.

    python -m benchmarks.image_tower                              # convnext_tiny, 224 px; batch 32 on CPU, 256 on GPU
    python -m benchmarks.image_tower --model resnet50 --batch-size 128 --compile

liteclip's settings: channels_last, bf16 autocast where train.precision: auto takes it (else fp32), and on the
CPU freed memory kept for the next step (liteclip.runtime). The tower's FLOPs per image are counted with
PyTorch's FlopCounterMode on the forward (2 per multiply-add, convolutions and matrix products; elementwise work is
not counted, so the fraction is of useful matrix work, as model FLOP utilisation usually is); a training step
counts three forwards. The attainable peak is measured on the spot with a large matrix product in the same dtype;
on a GPU of known kind the vendor's dense bf16 figure is printed as well.
Random init: weights do not change the cost.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liteclip.runtime import keep_freed_memory_for
from liteclip.precision import resolve_precision

# vendors' dense bf16 tensor-core peaks, TFLOP/s (no sparsity); checked in this order against the device name
SPEC_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0))


def spec_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in SPEC_BF16_TFLOPS if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call, the best of `repeats` after two warm-up calls (the least disturbed on a shared machine)."""
    for _ in range(2):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """What this device reaches on a large square matrix product in `dtype`: the attainable peak."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 3)
    return 2 * n**3 / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convnext_tiny", help="timm model name")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on GPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: 3 on CPU, 20 on GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the tower first")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    precision = resolve_precision("auto", device)  # as train.precision: auto decides
    bf16 = precision.dtype == torch.bfloat16
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = precision.autocast if bf16 else contextlib.nullcontext  # bf16 or fp32: no fp16 scaler needed here

    torch.manual_seed(0)
    tower = timm.create_model(args.model, pretrained=False, num_classes=0).to(device)
    tower = tower.to(memory_format=torch.channels_last)
    pixels = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    if args.compile:
        tower.compile()

    def forward() -> None:
        with torch.no_grad(), autocast():
            tower(pixels)

    def train_step() -> None:
        with autocast():
            features = tower(pixels)
        features.float().sum().backward()
        tower.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast():
        tower(pixels[:1])
    forward_flops_per_image = counter.get_total_flops()
    # backward is twice the forward (gradients for inputs and for weights), the usual convention; the counter's own
    # convolution_backward formula overcounts grouped (depthwise) convolutions (torch 2.14, convnext_tiny: 51.9
    # GFLOP counted for a backward whose forward convolutions are 0.59)
    train_flops_per_image = 3 * forward_flops_per_image

    with keep_freed_memory_for(device):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tower.eval()
        forward_seconds = timed(forward, device, repeats)
        tower.train()
        train_seconds = timed(train_step, device, repeats)
        peak = matmul_peak_tflops(device, dtype)
    spec = spec_peak_tflops(device)

    name = device_name(device)
    print(f"device: {name}; {args.model} at {args.image_size} px, batch {batch_size}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, channels_last{', compiled' if args.compile else ''}")
    print(f"matrix work per image: forward {forward_flops_per_image / 1e9:.3g} GFLOP, "
          f"forward+backward {train_flops_per_image / 1e9:.3g} GFLOP")
    print(f"attainable peak (square {dtype} matmul here): {peak:.3g} TFLOP/s"
          + (f"; vendor dense bf16 peak {spec:.0f} TFLOP/s" if spec else ""))
    for label, seconds, flops in (("inference", forward_seconds, forward_flops_per_image),
                                  ("training (fwd+bwd)", train_seconds, train_flops_per_image)):
        rate = batch_size / seconds
        achieved = rate * flops / 1e12
        line = (f"{label:20s} {rate:9.1f} images/s   {achieved:8.3g} TFLOP/s   "
                f"{100 * achieved / peak:6.3g}% of attainable peak")
        if spec:
            line += f"   {100 * achieved / spec:6.3g}% of vendor peak"
        print(line)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()

"""Images per second through decode + training augmentation, per worker, for full-size versus prepared images.

    python benchmarks/data_throughput.py                       # synthetic Flickr-sized JPEGs (500x375)
    python benchmarks/data_throughput.py --root data/flickr8k/Flicker8k_Dataset --num-images 300

One process is one DataLoader worker: N workers deliver about N times this, until the cores run out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from liteclip.data.captions import load_image
from liteclip.data.download import prepare_images
from liteclip.data.transforms import train_transform


def synthetic_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """Photo-like JPEGs (smooth gradients plus noise, so they compress like photos, not like flat colour)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    paths = []
    for i in range(count):
        base = np.stack([(x * rng.uniform(0.2, 0.6) + i) % 256, (y * rng.uniform(0.2, 0.6)) % 256,
                         ((x + y) * 0.3) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(paths: list[Path], size: int, repeats: int = 2) -> float:
    data_config = {"input_size": (3, size, size), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                   "crop_pct": 0.875, "interpolation": "bicubic"}
    transform = train_transform(data_config, crop_scale=(0.6, 1.0))
    torch.manual_seed(0)
    for path in paths[:5]:  # warm-up
        transform(load_image(path, size))
    start = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            transform(load_image(path, size))
    return repeats * len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="a folder of images (default: synthetic JPEGs)")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prepared-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker = one core
    with tempfile.TemporaryDirectory() as tmp:
        if args.root is None:
            source = Path(tmp) / "full"
            synthetic_jpegs(source, args.num_images)
        else:
            source = args.root
        full = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.num_images]
        before, after, _ = prepare_images(source, Path(tmp) / "prepared", args.prepared_size, show_progress=False)
        prepared = [Path(tmp) / "prepared" / p.relative_to(source) for p in full]
        with Image.open(full[0]) as image:
            full_size = image.size
        full_rate = images_per_second(full, args.image_size)
        prepared_rate = images_per_second(prepared, args.image_size)
    print(f"images: {len(full)} (full size {full_size[0]}x{full_size[1]}), training transform at {args.image_size} px")
    print(f"full-size:         {full_rate:8.1f} images/s per worker")
    print(f"prepared ({args.prepared_size} px):  {prepared_rate:8.1f} images/s per worker")
    print(f"disk: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    print(f"prepared_speedup={prepared_rate / full_rate:.2f}")


if __name__ == "__main__":
    main()

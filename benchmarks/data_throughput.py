"""Images per second through decode + training augmentation, per worker: full-size versus prepared images, and the
prepared images read as loose files (ImageCaptionDataset) versus streamed from webdataset shards (ShardStream).

    python -m benchmarks.data_throughput                       # synthetic Flickr-sized JPEGs (500x375)
    python -m benchmarks.data_throughput --root data/flickr8k/Flicker8k_Dataset --num-images 300

One process is one DataLoader worker: N workers deliver about N times this, until the cores run out. Loose files
and shards are timed in alternating rounds in one run (the better round of each is printed), on files the page
cache already holds: this is the per-sample CPU cost; what shards save on a network file system or object store
(one open per shard instead of one per image) is not measured here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from liteclip.data.captions import CaptionedImage, ImageCaptionDataset, load_image
from liteclip.data.download import prepare_images
from liteclip.data.shards import ShardStream, expand_shards, write_shards
from liteclip.data.transforms import train_transform

DATA_CONFIG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875,
               "interpolation": "bicubic"}


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
    transform = train_transform({"input_size": (3, size, size), **DATA_CONFIG}, crop_scale=(0.6, 1.0))
    torch.manual_seed(0)
    for path in paths[:5]:  # warm-up
        transform(load_image(path, size))
    start = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            transform(load_image(path, size))
    return repeats * len(paths) / (time.perf_counter() - start)


def files_versus_shards(paths: list[Path], size: int, shard_dir: Path, rounds: int = 3) -> tuple[float, float]:
    """(loose files, shards) samples/s of the same images through the training datasets, one process each."""
    transform = train_transform({"input_size": (3, size, size), **DATA_CONFIG}, crop_scale=(0.6, 1.0))
    images = [CaptionedImage(path, [f"a photo, number {i}"]) for i, path in enumerate(paths)]
    files = ImageCaptionDataset(images, transform, "one", size)
    pattern, _ = write_shards(images, shard_dir, "bench", shard_size=max(len(images) // 4, 1), seed=None)
    stream = ShardStream(expand_shards(pattern), len(images), min(16, len(images)), transform, size, shuffle_buffer=100)

    def read_files() -> int:
        return sum(1 for i in range(len(files)) if files[(i, i)] is not None)

    def read_shards() -> int:
        return sum(1 for _ in stream)

    rates: dict[str, list[float]] = {"files": [], "shards": []}
    for _ in range(rounds):
        for name, read in (("files", read_files), ("shards", read_shards)):
            start = time.perf_counter()
            count = read()
            rates[name].append(count / (time.perf_counter() - start))
    return max(rates["files"]), max(rates["shards"])


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
        files_rate, shards_rate = files_versus_shards(prepared, args.image_size, Path(tmp) / "shards")
    print(f"images: {len(full)} (full size {full_size[0]}x{full_size[1]}), training transform at {args.image_size} px")
    print(f"full-size:         {full_rate:8.1f} images/s per worker")
    print(f"prepared ({args.prepared_size} px):  {prepared_rate:8.1f} images/s per worker")
    print(f"disk: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    print(f"prepared, loose files (ImageCaptionDataset): {files_rate:8.1f} samples/s per worker")
    print(f"prepared, webdataset shards (ShardStream):   {shards_rate:8.1f} samples/s per worker")
    print(f"prepared_speedup={prepared_rate / full_rate:.2f}")
    print(f"shards_vs_files={shards_rate / files_rate:.2f}")


if __name__ == "__main__":
    main()

"""Inference figures: ZeroShotPipeline latency (one image, 10 cached labels) against the image tower's bare forward,
indexing throughput, text-query latency over a 10,000-image index, and the resident memory of predict over a list
of 1,000 and of 10,000 image files, which must not grow with the count.

    python -m benchmarks.inference                      # convnext_tiny + a bert-mini-shaped text tower, random init
    python -m benchmarks.inference --model-dir model    # a trained model
    python -m benchmarks.inference --predict-counts 1000 10000 --skip-latency   # the memory figures alone

Random weights time the same as trained ones; the default model is built offline from configs alone. Each memory
figure comes from a fresh process (peak RSS is per process): its peak during predict, and that peak less the
resident memory after loading the model. The memory runs use --memory-image-model (timm's 3-block test_convnext3 by
default, at the same 224 px): what the list costs does not depend on the tower, and 10,000 images then take a minute,
not an hour, on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from liteclip.config import config_from_dict

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_throughput import write_text_shape
from liteclip.model import build_model
from liteclip.pipeline import ZeroShotPipeline
from liteclip.search.image_search import ImageSearch, view_of_arrays

LABELS = [f"a photo of a {name}" for name in
          ("dog", "cat", "car", "bird", "boat", "horse", "child", "bicycle", "mountain", "beach")]


def build_default_model(directory: Path, image_name: str, image_size: int) -> Path:
    text_dir = write_text_shape(directory / "bert_mini_shape")
    config = config_from_dict({"model": {"image": {"name": image_name, "pretrained": False, "image_size": image_size},
                                         "text": {"name": str(text_dir), "pretrained": False}}})
    build_model(config.model).save_pretrained(directory / "model")
    return directory / "model"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def memory_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_predict(model_dir: Path, folder: Path, count: int, batch_size: int) -> None:
    """In a fresh process: predict over the first `count` files of `folder`; prints the memory figures."""
    pipeline = ZeroShotPipeline(model_dir, device="cpu")
    files = sorted(folder.iterdir())[:count]
    pipeline.predict(files[:2], LABELS, show_progress=False)  # label embeddings and first-batch allocations
    loaded = memory_kib("VmRSS")
    start = time.perf_counter()
    results = pipeline.predict(files, LABELS, batch_size=batch_size, show_progress=False)
    elapsed = time.perf_counter() - start
    assert len(results) == count and all(results)
    peak = memory_kib("VmHWM")
    print(f"memory {count} {peak} {peak - loaded} {count / elapsed:.1f}")


def predict_memory(tmp: Path, counts: list[int], image_model: str, image_size: int,
                   batch_size: int) -> list[tuple[int, int, int, float]]:
    """(count, peak RSS KiB, KiB above the loaded model, images/s) of predict over each count of image files, each
    from a fresh process."""
    model_dir = build_default_model(tmp / "memory_model", image_model, image_size)
    folder = tmp / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    tiles = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(16)]
    for i in range(max(counts)):  # distinct file names, a few distinct contents (decode cost is the same)
        tiles[i % len(tiles)].save(folder / f"{i:06d}.jpg", quality=85)
    figures = []
    for count in counts:
        result = subprocess.run([sys.executable, "-m", "benchmarks.inference", "--measure-predict", str(count),
                                 "--model-dir", str(model_dir), "--folder", str(folder), "--batch-size",
                                 str(batch_size)], capture_output=True, text=True, check=True)
        _, n, peak, growth, rate = result.stdout.strip().splitlines()[-1].split()
        figures.append((int(n), int(peak), int(growth), float(rate)))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--image-model", default="convnext_tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--num-index-images", type=int, default=64)
    parser.add_argument("--predict-counts", type=int, nargs="*", default=[1000, 10000],
                        help="list lengths for the predict memory figures (none: skip them)")
    parser.add_argument("--memory-image-model", default="test_convnext3")
    parser.add_argument("--batch-size", type=int, default=64, help="predict's batch size in the memory runs")
    parser.add_argument("--skip-latency", action="store_true", help="only the memory figures")
    parser.add_argument("--measure-predict", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_predict is not None:
        measure_predict(args.model_dir, args.folder, args.measure_predict, args.batch_size)
        return
    if not args.skip_latency:
        latency(args)
    if args.predict_counts:
        with tempfile.TemporaryDirectory() as tmp:
            figures = predict_memory(Path(tmp), sorted(args.predict_counts), args.memory_image_model,
                                     args.image_size, args.batch_size)
        print(f"predict memory ({args.memory_image_model} at {args.image_size} px, batch {args.batch_size}, "
              f"10 labels, one fresh process per count):")
        for count, peak, growth, rate in figures:
            print(f"predict over {count:>6,} images: peak RSS {peak / 2**20:6.2f} GiB, {growth / 2**10:7.1f} MiB above "
                  f"the loaded model, {rate:6.1f} images/s")
        print(f"memory_growth_largest_vs_smallest_mib={(figures[-1][2] - figures[0][2]) / 2**10:.1f}")


def latency(args: argparse.Namespace) -> None:
    """The latency and throughput figures."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model_dir or build_default_model(tmp, args.image_model, args.image_size)
        pipeline = ZeroShotPipeline(model_dir, device="cpu")
        size = pipeline.model.data_config["input_size"][-1]
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        pipeline.predict(image, LABELS)  # fills the label cache

        pixels = pipeline.transform(np.asarray(image)).unsqueeze(0)
        with torch.no_grad():
            tower_ms = median_ms(lambda: pipeline.model.image_features(pixels), args.repeats)
        predict_ms = median_ms(lambda: pipeline.predict(image, LABELS), args.repeats)

        folder = tmp / "images"
        folder.mkdir()
        for i in range(args.num_index_images):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        search = ImageSearch(pipeline)
        start = time.perf_counter()
        search.index(folder, tmp / "index", show_progress=False)
        index_rate = args.num_index_images / (time.perf_counter() - start)

        # a 10,000-image index: the query cost is one text encoding plus one (10000, D) matrix-vector product
        search.view = view_of_arrays([f"img_{i}.jpg" for i in range(10_000)], torch.nn.functional.normalize(
            torch.randn(10_000, pipeline.model.config.projection.dim), dim=-1))
        query_ms = median_ms(lambda: search.search("a dog running on the beach", top_k=5), args.repeats)

    print(f"model: {pipeline.model.config.image.name} at {size} px + {pipeline.model.text_encoder.model.config.num_hidden_layers}"
          f"-layer, {pipeline.model.text_encoder.num_features}-wide text tower; threads: {torch.get_num_threads()}")
    print(f"image tower bare forward (1 image):          {tower_ms:8.1f} ms")
    print(f"pipeline.predict (1 image, 10 cached labels): {predict_ms:8.1f} ms")
    print(f"indexing throughput:                          {index_rate:8.1f} images/s")
    print(f"text query over a 10,000-image index:         {query_ms:8.1f} ms")
    print(f"predict_vs_bare_tower={predict_ms / tower_ms:.3f}")


if __name__ == "__main__":
    main()

"""Inference figures: ZeroShotPipeline latency (one image, 10 cached labels) against the image tower's bare forward,
indexing throughput, and text-query latency over a 10,000-image index.

    python -m benchmarks.inference                      # convnext_tiny + a bert-mini-shaped text tower, random init
    python -m benchmarks.inference --model-dir model    # a trained model

Random weights time the same as trained ones; the default model is built offline from configs alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from liteclip.config import config_from_dict
from benchmarks.train_throughput import write_bert_mini_shape
from liteclip.model import build_model
from liteclip.pipeline import ImageSearch, ZeroShotPipeline

LABELS = [f"a photo of a {name}" for name in
          ("dog", "cat", "car", "bird", "boat", "horse", "child", "bicycle", "mountain", "beach")]


def build_default_model(directory: Path, image_name: str, image_size: int) -> Path:
    text_dir = write_bert_mini_shape(directory / "bert_mini_shape")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--image-model", default="convnext_tiny")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--num-index-images", type=int, default=64)
    args = parser.parse_args()

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
        search.paths = [Path(f"img_{i}.jpg") for i in range(10_000)]
        search.embeddings = torch.nn.functional.normalize(torch.randn(10_000, pipeline.model.config.projection.dim), dim=-1)
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

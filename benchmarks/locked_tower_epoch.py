"""One training epoch with a locked image tower whose features are cached: the laptop path to full Flickr8K.

    python -m benchmarks.locked_tower_epoch                     # 6,000 pairs, convnext_tiny features, bert-mini shape

Only the epoch is timed: the cache itself is built once (the first run of `train.cache_image_features`), after
which each epoch trains the text tower, the heads and the temperature on stored (768-d for convnext_tiny) features.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.train_throughput import captions, write_bert_mini_shape
from liteclip.config import config_from_dict
from liteclip.data.captions import CaptionCollator, CaptionedImage, ImageCaptionDataset, SeededSampler
from liteclip.model import build_model
from liteclip.optim import build_optimizer, lr_multiplier, set_lr
from liteclip.feature_cache import CachedFeatureDataset
from liteclip.precision import resolve_precision
from liteclip.training import contrastive_step, optimizer_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-model", default="convnext_tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text_dir = write_bert_mini_shape(Path(tmp) / "bert_mini_shape")
        config = config_from_dict({"model": {
            "image": {"name": args.image_model, "pretrained": False, "tune": "locked"},
            "text": {"name": str(text_dir), "pretrained": False, "max_length": 64}}})
        model = build_model(config.model).train()
        texts = captions(args.pairs)
        images = [CaptionedImage(Path(f"{i}.jpg"), [text]) for i, text in enumerate(texts)]
        features = torch.randn(args.pairs, model.image_encoder.num_features)  # what the cache holds
        dataset = CachedFeatureDataset(ImageCaptionDataset(images, transform=None, captions="one"), features)
        sampler = SeededSampler(torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)), 0)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            collate_fn=CaptionCollator(model.tokenizer, 64))
        optimizer = build_optimizer(model, config.optim)
        precision = resolve_precision("auto", torch.device("cpu"))  # as train.precision: auto decides here
        start = time.perf_counter()
        steps = 0
        for batch in loader:
            batch = {k: v for k, v in batch.items() if k in ("image_features", "input_ids", "attention_mask")}
            set_lr(optimizer, lr_multiplier(steps, len(loader), config.optim))
            contrastive_step(model, [batch], precision, None)
            optimizer_step(model, optimizer, None, config.optim.grad_clip)
            steps += 1
        seconds = time.perf_counter() - start
    print(f"{args.pairs} pairs, batch {args.batch_size}, {steps} steps, image tower locked ({args.image_model} "
          f"features cached), text tower bert-mini shape, {precision.dtype or 'fp32'}; "
          f"threads {torch.get_num_threads()}")
    print(f"epoch_seconds={seconds:.1f}")


if __name__ == "__main__":
    main()

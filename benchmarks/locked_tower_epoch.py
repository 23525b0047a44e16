"""The LiT path: a locked image tower whose features are cached, a trainable text tower. Times what a user
waits for each epoch: the training epoch over 6,000 pairs and the evaluation after it, retrieval over 1,000
validation images with 5 captions each (5,000 captions through the text tower), as the trainer runs it.

    python -m benchmarks.locked_tower_epoch                          # bert-mini shape (4 layers, 256 wide)
    python -m benchmarks.locked_tower_epoch --text-shape minilm-l3   # MiniLM-L3-H384 shape (3 layers, 384 wide)
    python -m benchmarks.locked_tower_epoch --precision fp32         # against train.precision: auto's choice
    python -m benchmarks.locked_tower_epoch --device cuda            # the same epoch on a GPU (default: auto, as
                                                                     # train.device picks)
    python -m benchmarks.locked_tower_epoch --captions $R/flickr8k_raw/captions.txt \
        --text-tower $R/weights/paraphrase-MiniLM-L3-v2/hf    # real captions, tokenised by a real tower's tokenizer
    python -m benchmarks.locked_tower_epoch --length-groups 1        # the levers: each batch encoded whole,
    python -m benchmarks.locked_tower_epoch --compile                # or the text tower under torch.compile

The cache itself is built once (the first run of `train.cache_image_features`) and is not timed; here the features
are random tensors of the tower's width (768 for convnext_tiny, 1280 for efficientnet_lite0): they cost the same.
Text towers are random-init with the named shape and a 30,522-token vocabulary, built offline. The captions are
synthetic, 8 to 20 words, unless --captions names a file of real ones (a CSV with a `caption` column, such as
Flickr8K's captions.txt, or one caption a line). With real captions, give --text-tower too (a local Hugging Face
model directory, built from its config with random weights): the shapes' tokenizers are trained on a small word list
and split real words into pieces, so only a real tokenizer gives real lengths, and so the padding a batch carries.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repository root holds `benchmarks`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.image_tower import device_name, synchronize
from benchmarks.train_throughput import TEXT_SHAPES, captions, write_text_shape
from liteclip.config import TextEncoderConfig, config_from_dict
from liteclip.data.captions import CaptionCollator, CaptionedImage, ImageCaptionDataset, SeededSampler
from liteclip.distributed import resolve_device
from liteclip.evaluation import evaluate_retrieval
from liteclip.train.feature_cache import CachedFeatureDataset
from liteclip.model import build_model
from liteclip.train.optim import build_optimizer, lr_multiplier, set_lr
from liteclip.precision import resolve_precision
from liteclip.runtime import keep_freed_memory_for
from liteclip.train.loop import compile_towers, contrastive_step, optimizer_step


def caption_texts(path: Path | None, count: int) -> list[str]:
    """`count` captions: synthetic ones, or the file's in a seeded shuffle (repeated if it holds fewer)."""
    if path is None:
        return captions(count)
    with open(path, newline="", encoding="utf-8") as handle:
        first = handle.readline()
        handle.seek(0)
        if "caption" in first.strip().lower().split(","):
            texts = [row["caption"] for row in csv.DictReader(handle) if row.get("caption")]
        else:
            texts = [line.strip() for line in handle if line.strip()]
    if not texts:
        raise SystemExit(f"{path}: no captions found (a CSV with a 'caption' column, or one caption a line)")
    random.Random(0).shuffle(texts)
    return [texts[i % len(texts)] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--eval-images", type=int, default=1000, help="validation images, 5 captions each")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--image-model", default="convnext_tiny",
                        help="the locked tower whose cached features are simulated (efficientnet_lite0: 1280-d)")
    parser.add_argument("--text-shape", choices=sorted(TEXT_SHAPES), default="bert-mini")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--captions", type=Path, help="a file of real captions to train and evaluate on")
    parser.add_argument("--text-tower", type=Path, help="a local Hugging Face text model directory instead of a shape")
    parser.add_argument("--length-groups", type=int, default=TextEncoderConfig.length_groups,
                        help="model.text.length_groups (1: each batch encoded whole, padded to its longest)")
    parser.add_argument("--compile", action="store_true", help="the towers under torch.compile (train.compile)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        text_dir = args.text_tower or write_text_shape(Path(tmp) / args.text_shape, args.text_shape)
        config = config_from_dict({"model": {
            "image": {"name": args.image_model, "pretrained": False, "tune": "locked"},  # never run: features cached
            "text": {"name": str(text_dir), "pretrained": False, "max_length": 64,
                     "length_groups": args.length_groups}}})
        torch.manual_seed(0)
        model = build_model(config.model).to(device)
        width = model.image_encoder.num_features
        texts = caption_texts(args.captions, args.pairs + 5 * args.eval_images)
        images = [CaptionedImage(Path(f"{i}.jpg"), [text]) for i, text in enumerate(texts[:args.pairs])]
        val = [CaptionedImage(Path(f"val{i}.jpg"), texts[args.pairs + 5 * i:args.pairs + 5 * i + 5])
               for i in range(args.eval_images)]
        features = torch.randn(args.pairs, width)  # what the cache holds
        val_features = torch.randn(args.eval_images, width)
        dataset = CachedFeatureDataset(ImageCaptionDataset(images, transform=None, captions="one"), features)
        sampler = SeededSampler(torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)), 0)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            collate_fn=CaptionCollator(model.tokenizer, 64))
        optimizer = build_optimizer(model, config.optim)
        if args.compile:
            compile_towers(model)

        with keep_freed_memory_for(device, config.train.keep_cpu_memory):  # as the trainer runs its epochs
            start = time.perf_counter()
            model.train()
            steps = 0
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                         if k in ("image_features", "input_ids", "attention_mask")}
                set_lr(optimizer, lr_multiplier(steps, len(loader), config.optim))
                contrastive_step(model, [batch], precision, None)
                optimizer_step(model, optimizer, None, config.optim.grad_clip)
                steps += 1
            synchronize(device)
            trained = time.perf_counter()
            metrics = evaluate_retrieval(model, val, args.eval_batch_size, device, precision.autocast,
                                         show_progress=False, image_features=val_features)
            synchronize(device)
            evaluated = time.perf_counter()
    layers, text_width = model.text_encoder.model.config.num_hidden_layers, model.text_encoder.num_features
    tower = args.text_tower or f"{args.text_shape} shape"
    print(f"{args.pairs} pairs, batch {args.batch_size}, {steps} steps; evaluation over {args.eval_images} images and "
          f"{5 * args.eval_images} captions (batch {args.eval_batch_size}); text tower {tower} "
          f"({layers} layers, {text_width} wide), cached {args.image_model} features ({width}-d), "
          f"{precision.dtype or 'fp32'}, {device_name(device)}; captions {args.captions or 'synthetic'}, "
          f"length groups {args.length_groups}{', compiled' if args.compile else ''}")
    print(f"train {trained - start:.2f} s ({steps * args.batch_size / (trained - start):.0f} samples/s), "
          f"evaluation {evaluated - trained:.2f} s (mean recall {metrics['mean_recall']:.1f}, random weights)")
    print(f"epoch_seconds={evaluated - start:.1f}")


if __name__ == "__main__":
    main()

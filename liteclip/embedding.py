"""Batched embedding with a trained model: texts, class labels averaged over prompt templates, and image files.

The one place these are computed: the pipeline, the evaluators, the trainer's evaluation and the locked-tower
feature cache all call it, so a metric cannot drift between the trainer and `liteclip eval-*`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from liteclip.data.captions import CaptionedImage, ImageCaptionDataset
from liteclip.data.transforms import eval_transform, image_size
from liteclip.errors import InputError
from liteclip.model import CLIP
from liteclip.runtime import keep_freed_memory_for

Autocast = Callable[[], contextlib.AbstractContextManager]


@torch.no_grad()
def encode_texts(model: CLIP, texts: Sequence[str], batch_size: int = 256, device: torch.device | str = "cpu",
                 autocast: Autocast = contextlib.nullcontext) -> torch.Tensor:
    """(N, D) normalised text embeddings; each batch is padded only to its longest text."""
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer; save it with save_pretrained from a built model")
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenizer(list(texts[start:start + batch_size]), padding="longest", truncation=True,
                                 max_length=model.config.text.max_length, return_tensors="pt").to(device)
        with autocast():
            chunks.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float())
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.projection.dim)


def encode_labels(model: CLIP, labels: Sequence[str], templates: Sequence[str] | None = None,
                  device: torch.device | str = "cpu", autocast: Autocast = contextlib.nullcontext) -> torch.Tensor:
    """(C, D) normalised class embeddings: each label formatted into every template, embedded, averaged and
    renormalised, as the CLIP paper's prompt ensembling; without templates, each label as written."""
    if not templates:
        return encode_texts(model, list(labels), device=device, autocast=autocast)
    for template in templates:
        if "{}" not in template:
            raise InputError(f"template {template!r} has no '{{}}' where the label goes")
    prompts = [template.format(label) for label in labels for template in templates]
    embeds = encode_texts(model, prompts, device=device, autocast=autocast)  # (C*T, D)
    embeds = embeds.view(len(labels), len(templates), -1).mean(dim=1)  # (C, D)
    return torch.nn.functional.normalize(embeds, dim=-1)


def stack_pixels(samples: list[dict[str, Any]]) -> torch.Tensor:
    """Collate for image-only loaders (module level, so spawned DataLoader workers can pickle it)."""
    return torch.stack([sample["pixel_values"] for sample in samples])


@torch.no_grad()
def encode_image_files(model: CLIP, paths: Sequence[Path], batch_size: int = 64, device: torch.device | str = "cpu",
                       autocast: Autocast = contextlib.nullcontext, show_progress: bool = False,
                       num_workers: int = 0, tower_features: bool = False) -> torch.Tensor:
    """(N, D) normalised image embeddings of image files, decoded in a DataLoader so workers can overlap; with
    tower_features, the image tower's pooled features (N, F) before the head instead."""
    dataset = ImageCaptionDataset([CaptionedImage(Path(p), [""]) for p in paths], eval_transform(model.data_config),
                                  "first", image_size(model.data_config))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=stack_pixels)
    encode = model.image_features if tower_features else model.encode_image
    chunks = []
    # batches of activations above glibc's mmap threshold: keep freed memory rather than fault it in every batch
    with keep_freed_memory_for(torch.device(device)):
        for pixels in tqdm(loader, desc="encoding images", disable=not show_progress, unit="batch"):
            with autocast():
                chunks.append(encode(pixels.to(device)).float())
    width = model.image_encoder.num_features if tower_features else model.config.projection.dim
    return torch.cat(chunks) if chunks else torch.empty(0, width)

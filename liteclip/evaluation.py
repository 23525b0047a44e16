"""Evaluating a model: retrieval recall on a captioned split, and zero-shot classification of labelled images.

The one evaluation path: the trainer's per-epoch and final evaluation and `liteclip eval-retrieval` /
`liteclip eval-zeroshot` all call these functions, on embeddings from liteclip.embedding. Library code: it never
imports the trainer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from liteclip.data.captions import CaptionedImage, ZeroShotTask, caption_offsets
from liteclip.embedding import Autocast, encode_decodable_image_files, encode_labels, encode_texts, model_device
from liteclip.config import RetentionSet
from liteclip.errors import DataError
from liteclip.loss import LOSSES, clip_loss
from liteclip.metrics import caption_groups_of, retrieval_recall, zero_shot_accuracy, zero_shot_ranks
from liteclip.model import CLIP


@torch.no_grad()
def evaluate_retrieval(model: CLIP, images: list[CaptionedImage], batch_size: int = 64,
                       device: torch.device | str | None = None, autocast: Autocast = contextlib.nullcontext,
                       show_progress: bool = True, num_workers: int = 0,
                       image_features: torch.Tensor | None = None, loss_name: str = "clip",
                       image_loader: DataLoader | None = None) -> dict[str, float]:
    """Retrieval recall R@1/5/10 both ways over a whole split (all captions of each image), and its contrastive loss.
    A caption text several images share is correct for each of them, and ties count against the model
    (liteclip.metrics).

    Args:
        images: the split.
        batch_size: images per encoding batch; also the batch the `loss` is taken over.
        image_features: (N, F) the image tower's cached features for `images` (a locked tower), used instead of
            decoding and encoding the files.
        loss_name: the loss `loss` is measured with ("clip" or "siglip", as loss.name).
        image_loader: an image_file_loader over the split's images to decode them with (the trainer keeps one whose
            workers persist between epochs); by default a new one of `num_workers` workers.

    Returns:
        retrieval_recall's keys (percent), and `loss`: the contrastive loss over consecutive batches of (image,
        first caption) pairs, averaged, as a validation loss comparable with the training loss.

    Images that do not decode are left out (with a warning naming each), with their captions.
    """
    if not images:
        raise DataError("the split has no images")
    model.eval()
    device = model_device(model, device)
    if image_features is None:
        encoded = encode_decodable_image_files(model, [image.image_path for image in images], batch_size, device,
                                               autocast, show_progress=show_progress, num_workers=num_workers,
                                               loader=image_loader)
        if not encoded.kept:
            raise DataError(f"none of the split's {len(images)} images decodes (first: {encoded.skipped[0]})")
        images = [images[i] for i in encoded.kept]  # an image that does not decode is left out, with a warning
        image_embeds = encoded.embeds
    else:
        image_embeds = embed_image_features(model, image_features, batch_size, device, autocast)
    captions = [caption for image in images for caption in image.captions]
    text_to_image = torch.tensor([i for i, image in enumerate(images) for _ in image.captions])
    text_embeds = encode_texts(model, captions, batch_size, device, autocast)
    metrics = retrieval_recall(image_embeds.cpu(), text_embeds.cpu(), text_to_image,
                               caption_groups=caption_groups_of(captions))
    first_captions = torch.tensor(caption_offsets(images))  # (N,) each image's first caption
    metrics["loss"] = paired_loss(image_embeds, text_embeds[first_captions.to(text_embeds.device)],
                                  model.scale().float(), batch_size, model.logit_bias, LOSSES[loss_name])
    return metrics


def embed_image_features(model: CLIP, image_features: torch.Tensor, batch_size: int, device: torch.device | str,
                         autocast: Autocast) -> torch.Tensor:
    """(N, D) normalised image embeddings from (N, F) cached image-tower features."""
    chunks = []
    with autocast():  # one context: the head's weights are cast once
        for start in range(0, len(image_features), batch_size):
            features = image_features[start:start + batch_size].to(device)  # (B, F)
            chunks.append(model.encode_image(image_features=features).float())  # (B, D)
    return torch.cat(chunks)


def paired_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor, batch_size: int,
                bias: torch.Tensor | None = None, loss_fn: Callable[[torch.Tensor], torch.Tensor] = clip_loss) -> float:
    """Mean loss over consecutive batches of matching (image, text) rows; a batch of one has no negatives and is
    left out (NaN when no batch has two rows)."""
    offset = 0.0 if bias is None else bias.float()
    losses = [loss_fn(scale * image_embeds[start:start + batch_size] @ text_embeds[start:start + batch_size].t()
                      + offset)
              for start in range(0, len(image_embeds), batch_size) if len(image_embeds[start:start + batch_size]) > 1]
    return torch.stack(losses).mean().item() if losses else float("nan")


@torch.no_grad()
def evaluate_zero_shot(model: CLIP, task: ZeroShotTask, batch_size: int = 64, device: torch.device | str | None = None,
                       autocast: Autocast = contextlib.nullcontext, show_progress: bool = True,
                       num_workers: int = 0) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy (percent) of classifying each image by its nearest label embedding.

    Returns:
        {"top1", "top5" (or top-C with fewer classes), "chance": 100 / C,
         "per_class": {label: {"count", "top1"}}, "per_group": {group: {"count", "top1", ...}} for grouped items}
    """
    if not task.items:
        raise DataError("the zero-shot task has no images")
    model.eval()
    class_embeds = encode_labels(model, task.labels, task.templates, device, autocast)  # (C, D)
    encoded = encode_decodable_image_files(model, [item.image_path for item in task.items], batch_size, device,
                                           autocast, show_progress=show_progress, num_workers=num_workers)
    items = [task.items[i] for i in encoded.kept]  # an image that does not decode is left out, with a warning
    if not items:
        raise DataError(f"none of the task's {len(task.items)} images decodes (first: {encoded.skipped[0]})")
    class_embeds, image_embeds = class_embeds.cpu(), encoded.embeds.cpu()  # (C, D), (N, D)
    targets = torch.tensor([item.label for item in items])
    ks = (1, min(5, len(task.labels)))
    result: dict[str, Any] = zero_shot_accuracy(image_embeds, class_embeds, targets, ks)
    result["chance"] = 100.0 / len(task.labels)
    first = zero_shot_ranks(image_embeds, class_embeds, targets) == 0  # (N,) top-1 hits, ties counted as misses
    result["per_class"] = {task.labels[c]: {"count": int((targets == c).sum()),
                                            "top1": 100.0 * float(first[targets == c].float().mean())}
                           for c in range(len(task.labels)) if (targets == c).any()}
    groups = [item.group for item in items]
    result["per_group"] = {}
    for group in dict.fromkeys(g for g in groups if g is not None):
        mask = torch.tensor([g == group for g in groups])
        result["per_group"][group] = {"count": int(mask.sum()),
                                      **zero_shot_accuracy(image_embeds[mask], class_embeds, targets[mask], ks)}
    return result


# ------------------------------------------------------------------------------------------ retention sets


ZERO_SHOT_TEMPLATE = ("a photo of a {}.",)


def retention_task(retention: RetentionSet) -> ZeroShotTask | list[CaptionedImage]:
    """What a retention set evaluates: a zero-shot task, or a split's captioned images (read once per run, never
    generated or changed: a demo folder is read as it is)."""
    try:
        return read_retention_set(retention)
    except (DataError, OSError) as error:
        raise DataError(f"train.retention {retention.kind}:{retention.path}: {error}") from None


def read_retention_set(retention: RetentionSet) -> ZeroShotTask | list[CaptionedImage]:
    from liteclip.config import DataConfig
    from liteclip.data import load_splits
    from liteclip.data.image_folder import read_image_folder

    if retention.kind == "zeroshot":
        return read_image_folder(retention.path, ZERO_SHOT_TEMPLATE)
    if retention.kind == "csv":
        data = DataConfig(dataset="csv", root=str(retention.path.parent), captions_file=retention.path.name,
                          on_bad_row="skip")
    else:
        data = DataConfig(dataset=retention.kind, root=str(retention.path), on_bad_row="skip")
    split = load_splits(data, generate=False)[retention.split]
    if not split:
        raise DataError(f"train.retention: {retention.path} has no {retention.split} split to evaluate")
    return split


def evaluate_retention(model: CLIP, tasks: dict[RetentionSet, Any], batch_size: int = 64,
                       device: torch.device | str | None = None, autocast: Autocast = contextlib.nullcontext,
                       show_progress: bool = False) -> dict[str, float]:
    """{retention set name: its figure} for each (set, retention_task) in `tasks`."""
    figures = {}
    for retention, task in tasks.items():
        if retention.kind == "zeroshot":
            result = evaluate_zero_shot(model, task, batch_size, device, autocast, show_progress)
        else:
            result = evaluate_retrieval(model, task, batch_size, device, autocast, show_progress)
        figures[retention.name] = float(result[retention.metric])
    return figures

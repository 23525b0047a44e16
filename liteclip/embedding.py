"""Batched embedding with a trained model: texts, class labels averaged over prompt templates, and image files.

The one place these are computed: the pipeline, the evaluators, the trainer's evaluation and the locked-tower
feature cache all call it, so a metric cannot drift between the trainer and `liteclip eval-*`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from liteclip.data.captions import BadRow
from liteclip.data.images import ADVICE, UndecodableImageError, load_image, read_hashed
from liteclip.data.transforms import decode_side, eval_transform
from liteclip.errors import InputError
from liteclip.model import CLIP
from liteclip.runtime import keep_freed_memory_for

logger = logging.getLogger(__name__)

Autocast = Callable[[], contextlib.AbstractContextManager]


def model_device(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.device:
    """`device`, or where none is given the device the model's weights are on (a pipeline on "auto" may have put
    them on a GPU)."""
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.no_grad()
def encode_texts(model: CLIP, texts: Sequence[str], batch_size: int = 256,
                 device: torch.device | str | None = None, autocast: Autocast = contextlib.nullcontext) -> torch.Tensor:
    """(N, D) normalised text embeddings, in the order of `texts`, on `device` (by default the model's).

    Texts are batched by token length (each batch padded only to its longest text), so a batch of short captions
    does not pay for the one long one: for Flickr-like captions a fifth to a third less text-tower work than batches
    in the given order.
    """
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer; save it with save_pretrained from a built model")
    if model.tokenizer.pad_token_id is None:
        raise InputError("this model's tokenizer has no padding token; set tokenizer.pad_token (for example to its "
                         "end-of-text token) and save the model again")
    device = model_device(model, device)
    token_ids = model.tokenizer(list(texts), truncation=True, max_length=model.config.text.max_length)["input_ids"]
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    embeds = torch.empty(len(token_ids), model.config.projection.dim, device=device)
    with autocast():  # one context for every batch: autocast casts the weights once, then reuses them
        for start in range(0, len(token_ids), batch_size):
            rows = order[start:start + batch_size]
            input_ids, attention_mask = pad_token_ids([token_ids[i] for i in rows], model.tokenizer.pad_token_id,
                                                      model.tokenizer.padding_side)
            embeds[torch.tensor(rows, device=device)] = model.encode_text(input_ids.to(device),
                                                                          attention_mask.to(device)).float()
    return embeds


def pad_token_ids(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) input_ids and attention_mask of tokenised texts, padded on `side` to the longest: what the tokenizer's
    own padding gives, without tokenising the texts a second time."""
    longest = max(map(len, rows))
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, ids in enumerate(rows):
        span = slice(longest - len(ids), longest) if side == "left" else slice(0, len(ids))
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def check_template(template: Any) -> None:
    """A prompt template takes the label at its one `{}`; anything else is an InputError saying how to write it."""
    advice = "write one {} where the label goes, and double any literal brace: {{ or }}"
    if not isinstance(template, str):
        raise InputError(f"template {template!r} is not a string; {advice}")
    try:
        filled = template.format("\0")
    except (IndexError, KeyError, ValueError) as error:
        raise InputError(f"template {template!r} cannot take a label ({type(error).__name__}: {error}); "
                         f"{advice}") from None
    places = filled.count("\0")
    if places != 1:
        raise InputError(f"template {template!r} has {places or 'no'} place{'s' if places else ''} for the label; "
                         f"{advice}")


def encode_labels(model: CLIP, labels: Sequence[str], templates: Sequence[str] | None = None,
                  device: torch.device | str | None = None,
                  autocast: Autocast = contextlib.nullcontext) -> torch.Tensor:
    """(C, D) normalised class embeddings: each label formatted into every template, embedded, averaged and
    renormalised, as the CLIP paper's prompt ensembling; without templates, each label as written."""
    if not templates:
        return encode_texts(model, list(labels), device=device, autocast=autocast)
    for template in templates:
        check_template(template)
    prompts = [template.format(label) for label in labels for template in templates]
    embeds = encode_texts(model, prompts, device=device, autocast=autocast)  # (C*T, D)
    embeds = embeds.view(len(labels), len(templates), -1).mean(dim=1)  # (C, D)
    return torch.nn.functional.normalize(embeds, dim=-1)


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files as eval-transformed pixels; a file that does not decode yields its reason instead of pixels, so
    the main process decides whether to skip it or to stop (an error raised in a worker loses its type).

    load: reads one entry of `images` into an RGB uint8 array (the pipeline passes its to_array, so PIL images and
    arrays go through too); default: the file at that path, decoded whole.
    draft: JPEGs decoded at reduced scale in the DCT (PIL's draft mode), no smaller than the resize needs: several
    times faster on camera photos, for indexing a photo library; the pixels are close to, not equal to, what the
    checkpoint's own library computes, so evaluation leaves it off (docs/guarantees.md has the measured cost).
    """

    def __init__(self, images: Sequence[Any], data_config: dict[str, Any],
                 load: Callable[[Any], np.ndarray] | None = None, hash_content: bool = False, draft: bool = False):
        self.images = list(images) if load is not None else [Path(p) for p in images]
        self.transform = eval_transform(data_config)
        self.decode_size = decode_side(data_config) if draft else None
        self.load = load
        self.hash_content = hash_content  # each sample also carries the SHA-256 of the bytes it was decoded from

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, sha256 = self.images[index], None
        try:
            if self.hash_content:
                pixels, sha256 = read_hashed(image, self.decode_size)
            else:
                pixels = self.load(image) if self.load is not None else load_image(image, self.decode_size)
        except UndecodableImageError as error:
            return {"index": index, "error": error.reason}
        return {"index": index, "pixel_values": self.transform(pixels), "sha256": sha256}


def stack_decoded(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for ImageFileDataset (module level, so spawned DataLoader workers can pickle it)."""
    decoded = [s for s in samples if "pixel_values" in s]
    return {"pixel_values": torch.stack([s["pixel_values"] for s in decoded]) if decoded else None,
            "indices": [s["index"] for s in decoded],
            "sha256": [s.get("sha256") for s in decoded],
            "errors": [(s["index"], s["error"]) for s in samples if "error" in s]}


def image_file_loader(images: Sequence[Any], data_config: dict[str, Any], batch_size: int = 64, num_workers: int = 0,
                      load: Callable[[Any], np.ndarray] | None = None, hash_content: bool = False,
                      draft: bool = False, **loader_options: Any) -> DataLoader:
    """A DataLoader of images as eval-transformed pixels in stack_decoded batches (ImageFileDataset's `load`). A
    caller that encodes the same files again and again (the trainer's evaluation every epoch) builds one with
    persistent_workers=True and passes it to encode_decodable_image_files, so its workers start once."""
    return DataLoader(ImageFileDataset(images, data_config, load, hash_content, draft), batch_size=batch_size,
                      num_workers=num_workers,
                      collate_fn=stack_decoded, **loader_options)


def batches_with_progress(loader: DataLoader, **tqdm_options: Any) -> tqdm:
    """A progress bar over a DataLoader's batches that iterates the loader once. tqdm.auto's class calls iter() on
    an iterable when it is built and again when it is looped over (tqdm issue #1598): on a loader with workers that
    started every worker twice, and the first set decoded its prefetched batches for nothing."""
    return tqdm(iter(loader), total=len(loader), **tqdm_options)


@dataclass
class EncodedImages:
    embeds: torch.Tensor  # (N_kept, D) normalised embeddings, or (N_kept, F) tower features
    kept: list[int]  # positions in the input list of the files that decoded, in order
    skipped: list[BadRow]  # the files that did not, with the reason
    sha256: list[str | None] = field(default_factory=list)  # per kept file: of the bytes decoded (hash_content)


@torch.no_grad()
def encode_decodable_image_files(model: CLIP, paths: Sequence[Path], batch_size: int = 64,
                                 device: torch.device | str | None = None,
                                 autocast: Autocast = contextlib.nullcontext,
                                 show_progress: bool = False, num_workers: int = 0,
                                 tower_features: bool = False, progress: tqdm | None = None,
                                 loader: DataLoader | None = None, hash_content: bool = False,
                                 draft: bool = False) -> EncodedImages:
    """Normalised image embeddings of the image files that decode, decoded in a DataLoader so workers can overlap;
    files that do not are skipped, logged and listed. With tower_features, the image tower's pooled features
    before the head instead. `progress`: a caller's bar (counting images) to advance instead of a bar of its own.
    `loader`: an image_file_loader over `paths` to use instead of a new one (batch_size and num_workers are its).
    `hash_content`: also the SHA-256 of the bytes each kept file was decoded from (read once: see read_hashed).
    `draft`: JPEGs decoded at reduced scale (ImageFileDataset), for indexing photos rather than evaluating."""
    if loader is None:
        loader = image_file_loader(paths, model.data_config, batch_size, num_workers, hash_content=hash_content,
                                   draft=draft)
    elif len(loader.dataset) != len(paths):
        raise ValueError(f"the loader has {len(loader.dataset)} images for {len(paths)} paths")
    encode = model.image_features if tower_features else model.encode_image
    device = model_device(model, device)
    dtype = next(model.parameters()).dtype  # a bf16 or fp16 model takes its pixels in its own dtype
    chunks, kept, skipped, hashes = [], [], [], []
    # batches of activations above glibc's mmap threshold: keep freed memory rather than fault it in every batch
    with keep_freed_memory_for(device):
        for batch in batches_with_progress(loader, desc="encoding images", unit="batch",
                                           disable=not show_progress or progress is not None):
            if progress is not None:
                progress.update(len(batch["indices"]) + len(batch["errors"]))
            for index, reason in batch["errors"]:
                logger.warning("skipped %s: %s", paths[index], reason)
                skipped.append(BadRow(Path(paths[index]), 0, reason))
            if batch["pixel_values"] is not None:
                with autocast():
                    chunks.append(encode(batch["pixel_values"].to(device, dtype)).float())
                kept.extend(batch["indices"])
                hashes.extend(batch["sha256"])
    width = model.image_encoder.num_features if tower_features else model.config.projection.dim
    return EncodedImages(torch.cat(chunks) if chunks else torch.empty(0, width), kept, skipped, hashes)


def encode_image_files(model: CLIP, paths: Sequence[Path], batch_size: int = 64,
                       device: torch.device | str | None = None, autocast: Autocast = contextlib.nullcontext,
                       show_progress: bool = False, num_workers: int = 0,
                       tower_features: bool = False, loader: DataLoader | None = None) -> torch.Tensor:
    """(N, D) normalised image embeddings of image files (or (N, F) tower features), one row per file; a file that
    does not decode is an UndecodableImageError naming it (encode_decodable_image_files skips such files, and
    says what `loader` may be)."""
    encoded = encode_decodable_image_files(model, paths, batch_size, device, autocast, show_progress, num_workers,
                                           tower_features, loader=loader)
    if encoded.skipped:
        bad = encoded.skipped[0]
        raise UndecodableImageError(f"{bad.file}: {bad.reason}; {ADVICE}", bad.file, bad.reason)
    return encoded.embeds

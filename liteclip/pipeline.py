"""Using a trained model: zero-shot classification.

    pipeline = ZeroShotPipeline()                      # loads ./model
    pipeline.predict("cat.jpg", ["a photo of a dog", "a photo of a cat"])  -> [("a photo of a cat", 0.93), ...]

This is library code: it imports the model, the embedding functions and the eval transform, never a wing. Search over
an indexed folder is liteclip.search (ImageSearch), evaluation liteclip.evaluation.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from liteclip.data.images import load_image, to_rgb
from liteclip.data.transforms import eval_transform
from liteclip.embedding import batches_with_progress, encode_labels, image_file_loader
from liteclip.errors import InputError, NonFiniteError
from liteclip.model import CLIP

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, np.ndarray]
LABEL_CACHE_SIZE = 64


# ------------------------------------------------------------------------------------------------ zero-shot


class ZeroShotPipeline:
    """Zero-shot image classification with a saved liteclip model.

    Args:
        model_dir: a directory written by CLIP.save_pretrained (default ./model, where train.py exports).
        device: "cpu", "cuda", ...; default CUDA when available.
        templates: prompt templates such as ["a photo of a {}."]; several are averaged as in the CLIP paper.
            None uses each label as written.
        model: an already loaded CLIP instead of model_dir.
        dtype: torch.bfloat16 or torch.float16 to run the model in half precision (GPUs; CPUs with AMX, or AVX-512
            BF16 where it is faster: see liteclip.precision); default: as loaded (float32). Similarities and
            probabilities are computed in float32 either way.
        trust_remote_code: allow a model folder that carries Python code of its own to run it (off: such a folder is
            refused, whatever its config.yaml says).

    `pipeline(image, labels)` is `pipeline.predict(image, labels)`. `pipeline.probabilities` says what the
    probabilities are: "softmax" over the labels (CLIP), or "sigmoid" of each label on its own (a model with a logit
    bias, trained with the SigLIP loss, as SigLIP checkpoints are; they need not sum to 1).
    """

    def __init__(self, model_dir: str | Path = "model", device: str | torch.device | None = None,
                 templates: Sequence[str] | None = None, model: CLIP | None = None,
                 dtype: torch.dtype | None = None, trust_remote_code: bool = False):
        try:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, TypeError):
            raise InputError(f"device {device!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:1' or "
                             f"'mps'") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but no CUDA device is visible here; use device='cpu'")
        if self.device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError(f"device {device!r} asked for, but MPS is not available here; use device='cpu'")
        self.model_dir = Path(model_dir)
        self.model = (model if model is not None
                      else CLIP.from_pretrained(model_dir, trust_remote_code=trust_remote_code))
        self.model = self.model.to(device=self.device, dtype=dtype).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.templates = list(templates) if templates else None
        self.transform = eval_transform(self.model.data_config)
        # a model trained with the sigmoid loss scores each label on its own, as it was trained to
        self.probabilities = "sigmoid" if getattr(self.model, "logit_bias", None) is not None else "softmax"
        self._label_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def encode_labels(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, D) label embeddings, averaged over templates; the last LABEL_CACHE_SIZE (labels, templates) sets are
        kept, so a long-running server asked for ever new labels does not grow without bound."""
        templates = list(templates) if templates else self.templates
        key = (tuple(labels), tuple(templates) if templates else None)
        if key in self._label_cache:
            self._label_cache.move_to_end(key)
        else:
            self._label_cache[key] = encode_labels(self.model, labels, templates, self.device)
            while len(self._label_cache) > LABEL_CACHE_SIZE:
                self._label_cache.popitem(last=False)
        return self._label_cache[key]

    def towers_as_trained(self) -> dict[str, str]:
        """{"image_tower", "text_tower"}: the towers' names as the model was trained (a loaded model's config points
        its text tower at the model folder)."""
        config = getattr(self.model, "trained_config", None) or self.model.config
        return {"image_tower": config.image.name, "text_tower": config.text.name}

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(N, D) normalised embeddings of paths, PIL images or uint8 arrays."""
        return self._embed_arrays([to_array(image) for image in images])

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """The model's input for one image (path, PIL image or uint8 array): a (3, H, W) float tensor."""
        return self.transform(to_array(image))

    def _embed_arrays(self, arrays: list[np.ndarray]) -> torch.Tensor:
        return self._embed_pixels(torch.stack([self.transform(array) for array in arrays]))

    def _embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, D) float32 embeddings of (N, 3, H, W) pixels, run in the model's own dtype."""
        return self.model.encode_image(pixels.to(self.device, self.dtype)).float()

    def __call__(self, image: ImageInput | Sequence[ImageInput], labels: Sequence[str], top_k: int | None = None,
                 templates: Sequence[str] | None = None):
        return self.predict(image, labels, top_k, templates)

    @torch.no_grad()
    def predict(self, image: ImageInput | Sequence[ImageInput], labels: Sequence[str], top_k: int | None = None,
                templates: Sequence[str] | None = None, batch_size: int = 64, show_progress: bool = True,
                num_workers: int = 0):
        """Classifies one image, or a list of images, among `labels`.

        A list goes through a DataLoader `batch_size` images at a time (`num_workers` processes decode while the
        model runs), with a progress bar past one batch: memory holds a few batches of pixels however long the
        list is.

        Returns:
            [(label, probability), ...] sorted by probability (softmax over all labels of the scaled cosine
            similarities; for a SigLIP-style model, `self.probabilities == "sigmoid"`, the sigmoid of each label's
            scaled similarity plus the bias), at most top_k of them; for a list of images, a list of such lists,
            with an empty list for a file that cannot be decoded (logged as skipped). A single image that cannot be
            decoded raises UndecodableImageError naming it.
        """
        labels = self._check_labels(labels, top_k, batch_size)
        label_embeds = self.encode_labels(labels, templates).float()  # (C, D)
        k = len(labels) if top_k is None else min(top_k, len(labels))
        if not isinstance(image, (list, tuple)):
            (row,) = self._probabilities(self.preprocess(image)[None], label_embeds)
            return self._top(row, labels, k)
        if not image:
            raise InputError("no images given")
        loader = image_file_loader(image, self.model.data_config, batch_size, num_workers, load=to_array)
        results: list[list[tuple[str, float]]] = [[] for _ in image]
        for batch in batches_with_progress(loader, desc="classifying", unit="batch",
                                           disable=not show_progress or len(loader) < 2):
            for index, reason in batch["errors"]:
                logger.warning("skipped %s: %s", image[index], reason)
            if batch["pixel_values"] is not None:
                for index, row in zip(batch["indices"], self._probabilities(batch["pixel_values"], label_embeds)):
                    results[index] = self._top(row, labels, k)
        return results

    @staticmethod
    def _check_labels(labels: Sequence[str], top_k: int | None, batch_size: int) -> list[str]:
        if isinstance(labels, str):
            raise InputError(f"labels must be a list of label texts, got the single string {labels!r}; "
                             f"pass [{labels!r}, ...] with at least 2 labels")
        try:
            labels = list(labels)  # a generator or a tuple is as good as a list
        except TypeError:
            raise InputError(f"labels must be a list of label texts, got {type(labels).__name__}") from None
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise InputError(f"every label must be a non-empty text, got {label!r} among {labels}")
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k={top_k}: ask for at least one label, or None for all")
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} must be at least 1")
        if len(labels) < 2:
            raise InputError(f"predict needs at least 2 labels to choose between, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise InputError("labels must be distinct")
        return list(labels)

    def _probabilities(self, pixels: torch.Tensor, label_embeds: torch.Tensor) -> torch.Tensor:
        """(N, C) label probabilities of (N, 3, H, W) pixels."""
        logits = self.model.scale().float() * self._embed_pixels(pixels) @ label_embeds.t()
        if self.probabilities == "sigmoid":
            logits = logits + self.model.logit_bias.float()
        if not torch.isfinite(logits).all():  # a diverged model: its "probabilities" would print as nan%
            raise NonFiniteError(f"the model in {self.model_dir} gives scores that are not finite (NaN or infinity); "
                                 f"its weights have diverged: use a model exported from an earlier checkpoint")
        return (logits.sigmoid() if self.probabilities == "sigmoid" else logits.softmax(dim=-1)).cpu()

    @staticmethod
    def _top(row: torch.Tensor, labels: list[str], k: int) -> list[tuple[str, float]]:
        values, indices = row.topk(k)
        return [(labels[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]


def to_array(image: ImageInput) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) from a path, a PIL image or an array (grayscale and RGBA accepted)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        return load_image(path)
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise InputError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InputError(f"image array of shape {image.shape} has no pixels")
        if image.dtype != np.uint8:
            raise InputError(f"image array must be uint8 (0-255), got {image.dtype}")
        return np.ascontiguousarray(image[..., :3])
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, a PIL.Image or a numpy array")

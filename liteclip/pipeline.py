"""Using a trained model: zero-shot classification, and text-to-image and image-to-image search.

    pipeline = ZeroShotPipeline()                      # loads ./model
    pipeline.predict("cat.jpg", ["a photo of a dog", "a photo of a cat"])  -> [("a photo of a cat", 0.93), ...]

This is library code: it imports the model, the embedding functions and the eval transform, never the trainer.
Evaluation lives in liteclip.evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from liteclip.checkpoint import atomic_write_bytes, read_safetensors, sha256_of
from liteclip.data.captions import BadRow
from liteclip.data.images import UndecodableImageError, load_image, to_rgb
from liteclip.data.image_folder import IMAGE_SUFFIXES, list_images
from liteclip.data.transforms import eval_transform
from liteclip.embedding import encode_decodable_image_files, encode_labels, encode_texts
from liteclip.errors import DataError, InputError, ModelLoadError
from liteclip.model import CLIP
from liteclip.pretrained import WEIGHTS_NAME

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, np.ndarray]


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a saved model's weights: an index built by another model is not reused."""
    return sha256_of(Path(model_dir) / WEIGHTS_NAME)[:16]


# ------------------------------------------------------------------------------------------------ zero-shot


class ZeroShotPipeline:
    """Zero-shot image classification with a saved liteclip model.

    Args:
        model_dir: a directory written by CLIP.save_pretrained (default ./model, where train.py exports).
        device: "cpu", "cuda", ...; default CUDA when available.
        templates: prompt templates such as ["a photo of a {}."]; several are averaged as in the CLIP paper.
            None uses each label as written.
        model: an already loaded CLIP instead of model_dir.
        dtype: torch.bfloat16 or torch.float16 to run the model in half precision (GPUs, AMX CPUs); default: as
            loaded (float32). Similarities and probabilities are computed in float32 either way.

    `pipeline(image, labels)` is `pipeline.predict(image, labels)`.
    """

    def __init__(self, model_dir: str | Path = "model", device: str | torch.device | None = None,
                 templates: Sequence[str] | None = None, model: CLIP | None = None,
                 dtype: torch.dtype | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but no CUDA device is visible here; use device='cpu'")
        if self.device.type == "mps" and not torch.backends.mps.is_available():
            raise InputError(f"device {device!r} asked for, but MPS is not available here; use device='cpu'")
        self.model_dir = Path(model_dir)
        self.model = (model if model is not None else CLIP.from_pretrained(model_dir))
        self.model = self.model.to(device=self.device, dtype=dtype).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.templates = list(templates) if templates else None
        self.transform = eval_transform(self.model.data_config)
        self._label_cache: dict[tuple, torch.Tensor] = {}

    def encode_labels(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, D) label embeddings, averaged over templates; cached per (labels, templates)."""
        templates = list(templates) if templates else self.templates
        key = (tuple(labels), tuple(templates) if templates else None)
        if key not in self._label_cache:
            self._label_cache[key] = encode_labels(self.model, labels, templates, self.device)
        return self._label_cache[key]

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(N, D) normalised embeddings of paths, PIL images or uint8 arrays."""
        return self._embed_arrays([to_array(image) for image in images])

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """The model's input for one image (path, PIL image or uint8 array): a (3, H, W) float tensor."""
        return self.transform(to_array(image))

    def _embed_arrays(self, arrays: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.stack([self.transform(array) for array in arrays])  # (N, 3, H, W)
        return self.model.encode_image(pixels.to(self.device, self.dtype)).float()  # (N, D)

    def __call__(self, image: ImageInput | Sequence[ImageInput], labels: Sequence[str], top_k: int | None = None,
                 templates: Sequence[str] | None = None):
        return self.predict(image, labels, top_k, templates)

    @torch.no_grad()
    def predict(self, image: ImageInput | Sequence[ImageInput], labels: Sequence[str], top_k: int | None = None,
                templates: Sequence[str] | None = None, batch_size: int = 64, show_progress: bool = True):
        """Classifies one image, or a list of images, among `labels`.

        A list is decoded and embedded `batch_size` images at a time (with a progress bar when there is more than
        one batch), so memory holds one batch of pixels however long the list is.

        Returns:
            [(label, probability), ...] sorted by probability (softmax over all labels of the scaled cosine
            similarities), at most top_k of them; for a list of images, a list of such lists, with an empty list
            for a file that cannot be decoded (logged as skipped). A single image that cannot be decoded raises
            UndecodableImageError naming it.
        """
        if isinstance(labels, str):
            raise InputError(f"labels must be a list of label texts, got the single string {labels!r}; "
                             f"pass [{labels!r}, ...] with at least 2 labels")
        labels = list(labels)
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k={top_k}: ask for at least one label, or None for all")
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} must be at least 1")
        if len(labels) < 2:
            raise InputError(f"predict needs at least 2 labels to choose between, got {labels}")
        if len(set(labels)) != len(labels):
            raise InputError("labels must be distinct")
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise InputError("no images given")
        label_embeds = self.encode_labels(labels, templates).float()  # (C, D)
        k = len(labels) if top_k is None else min(top_k, len(labels))
        results: list[list[tuple[str, float]]] = [[] for _ in images]
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="classifying", unit="batch", disable=not show_progress or len(starts) < 2):
            for position, row in self._probabilities(images[start:start + batch_size], start, label_embeds, single):
                values, indices = row.topk(k)  # row: (C,) probabilities of one image
                results[position] = [(labels[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]
        return results[0] if single else results

    def _probabilities(self, images: Sequence[ImageInput], offset: int, label_embeds: torch.Tensor,
                       single: bool) -> list[tuple[int, torch.Tensor]]:
        """(position, (C,) label probabilities) of each image of a chunk that decodes; the others are logged."""
        arrays, kept = [], []
        for position, image in enumerate(images, start=offset):
            try:
                arrays.append(to_array(image))
                kept.append(position)
            except UndecodableImageError as error:
                if single:
                    raise
                logger.warning("skipped %s", error)
        if not arrays:
            return []
        logits = self.model.scale().float() * self._embed_arrays(arrays) @ label_embeds.t()  # (N, C)
        return list(zip(kept, logits.softmax(dim=-1).cpu()))


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
        if image.dtype != np.uint8:
            raise InputError(f"image array must be uint8 (0-255), got {image.dtype}")
        return np.ascontiguousarray(image[..., :3])
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, a PIL.Image or a numpy array")


# --------------------------------------------------------------------------------------------------- search


class ImageSearch:
    """Text-to-image and image-to-image search over an indexed folder.

    The index (embeddings as safetensors, with the file list, each file's size and mtime, and the model's
    fingerprint) is saved next to nothing else: re-indexing encodes only new or changed files, and an index made by
    another model is rebuilt rather than mixed.
    """

    def __init__(self, pipeline: ZeroShotPipeline):
        self.pipeline = pipeline
        self.paths: list[Path] = []
        self.embeddings = torch.empty(0)
        self.skipped: list[BadRow] = []  # files the last index() call could not decode

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.pipeline.model_dir)

    def index(self, source: str | Path | Sequence[str | Path], index_path: str | Path | None = None,
              batch_size: int = 64, show_progress: bool = True) -> int:
        """Indexes every image under a folder, or a list of image files; returns how many were (re-)encoded."""
        from safetensors.torch import save

        files = list_images(source) if isinstance(source, (str, Path)) else [Path(p) for p in source]
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        fingerprint = self.fingerprint
        previous: dict[str, tuple[list, torch.Tensor]] = {}
        if index_path is not None and Path(index_path).is_file():
            meta, embeds = _read_index(Path(index_path))
            if meta.get("model") == fingerprint:
                previous = {e["path"]: (e["stamp"], embeds[i]) for i, e in enumerate(meta["files"])}
        keys = [str(p.resolve()) for p in files]
        stamps = {key: [stat.st_size, stat.st_mtime_ns] for key, stat in zip(keys, (p.stat() for p in files))}
        todo = [i for i, key in enumerate(keys) if previous.get(key, (None,))[0] != stamps[key]]
        embeddings = {key: embedding for key, (_, embedding) in previous.items()}
        self.skipped = []
        if todo:
            fresh = encode_decodable_image_files(self.pipeline.model, [files[i] for i in todo], batch_size,
                                                 self.pipeline.device, show_progress=show_progress)
            embeddings.update({keys[todo[j]]: fresh.embeds[row] for row, j in enumerate(fresh.kept)})
            self.skipped = fresh.skipped  # not indexed, so the next run tries them again
        keys = [key for key in keys if key in embeddings]
        if not keys:
            raise DataError(f"none of the {len(files)} images in {source} decodes (first: {self.skipped[0]})")
        self.paths = [Path(key) for key in keys]
        self.embeddings = torch.stack([embeddings[key] for key in keys]).cpu()
        if index_path is not None:
            meta = {"model": fingerprint, "files": [{"path": key, "stamp": stamps[key]} for key in keys]}
            atomic_write_bytes(index_path, save({"embeddings": self.embeddings.contiguous()},
                                                metadata={"liteclip_index": json.dumps(meta)}))
        logger.info("indexed %d images (%d encoded, %d reused, %d skipped)", len(keys), len(todo) - len(self.skipped),
                    len(files) - len(todo), len(self.skipped))
        return len(todo) - len(self.skipped)

    def load(self, index_path: str | Path) -> None:
        meta, embeds = _read_index(Path(index_path))
        if meta.get("model") != self.fingerprint:
            raise InputError(f"index {index_path} was built with another model; re-run `liteclip index`")
        self.paths = [Path(e["path"]) for e in meta["files"]]
        self.embeddings = embeds

    def _rank(self, query_embed: torch.Tensor, top_k: int) -> list[tuple[Path, float]]:
        if top_k < 1:
            raise InputError(f"top_k={top_k}: ask for at least one image")
        if not self.paths:
            raise InputError("the index is empty: call index(folder) or load(index_path) first")
        scores = self.embeddings.to(query_embed.device) @ query_embed  # (N,)
        values, indices = scores.topk(min(top_k, len(self.paths)))
        return [(self.paths[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def search(self, query: str, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images for a text query, with cosine similarities."""
        return self._rank(encode_texts(self.pipeline.model, [query], device=self.pipeline.device)[0].cpu(), top_k)

    def similar(self, image: ImageInput, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images most similar to `image`."""
        return self._rank(self.pipeline.encode_images([image])[0].cpu(), top_k)


def _read_index(path: Path) -> tuple[dict, torch.Tensor]:
    tensors, metadata = read_safetensors(path, "a search index: delete it and run `liteclip index` again")
    if "embeddings" not in tensors:
        raise ModelLoadError(f"{path} is not a liteclip search index; delete it and run `liteclip index` again")
    return json.loads(metadata.get("liteclip_index", "{}")), tensors["embeddings"]

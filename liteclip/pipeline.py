"""Using a trained model: zero-shot classification, text-to-image and image-to-image search, and evaluation.

    pipeline = ZeroShotPipeline()                      # loads ./model
    pipeline.predict("cat.jpg", ["a photo of a dog", "a photo of a cat"])  -> [("a photo of a cat", 0.93), ...]

This is library code: it imports the model, the checkpoint format and the eval transform, never the trainer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from liteclip.checkpoint import WEIGHTS_NAME, atomic_write_bytes
from liteclip.data.captions import CaptionedImage, load_image
from liteclip.data.transforms import eval_transform, image_size
from liteclip.metrics import retrieval_recall, zero_shot_accuracy
from liteclip.model import CLIP
from liteclip.runtime import keep_freed_memory_for

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, np.ndarray]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
Autocast = Callable[[], contextlib.AbstractContextManager]


# --------------------------------------------------------------------------------------- shared embedding code


@torch.no_grad()
def encode_texts(model: CLIP, texts: Sequence[str], batch_size: int = 256, device: torch.device | str = "cpu",
                 autocast: Autocast = contextlib.nullcontext) -> torch.Tensor:
    """(N, D) normalised text embeddings; each batch is padded only to its longest text."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer; save it with save_pretrained from a built model")
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenizer(list(texts[start:start + batch_size]), padding="longest", truncation=True,
                                 max_length=model.config.text.max_length, return_tensors="pt").to(device)
        with autocast():
            chunks.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float())
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.projection.dim)


def stack_pixels(samples: list[dict[str, Any]]) -> torch.Tensor:
    """Collate for image-only loaders (module level, so spawned DataLoader workers can pickle it)."""
    return torch.stack([sample["pixel_values"] for sample in samples])


@torch.no_grad()
def encode_image_files(model: CLIP, paths: Sequence[Path], batch_size: int = 64, device: torch.device | str = "cpu",
                       autocast: Autocast = contextlib.nullcontext, show_progress: bool = False,
                       num_workers: int = 0, tower_features: bool = False) -> torch.Tensor:
    """(N, D) normalised image embeddings of image files, decoded in a DataLoader so workers can overlap; with
    tower_features, the image tower's pooled features (N, F) before the head instead."""
    from torch.utils.data import DataLoader

    from liteclip.data.captions import ImageCaptionDataset

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


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a saved model's weights: an index built by another model is not reused."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_NAME, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ zero-shot


class ZeroShotPipeline:
    """Zero-shot image classification with a saved liteclip model.

    Args:
        model_dir: a directory written by CLIP.save_pretrained (default ./model, where train.py exports).
        device: "cpu", "cuda", ...; default CUDA when available.
        templates: prompt templates such as ["a photo of a {}."]; several are averaged as in the CLIP paper.
            None uses each label as written.
        model: an already loaded CLIP instead of model_dir.
    """

    def __init__(self, model_dir: str | Path = "model", device: str | torch.device | None = None,
                 templates: Sequence[str] | None = None, model: CLIP | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_dir = Path(model_dir)
        self.model = (model if model is not None else CLIP.from_pretrained(model_dir)).to(self.device).eval()
        self.templates = list(templates) if templates else None
        self.transform = eval_transform(self.model.data_config)
        self._label_cache: dict[tuple, torch.Tensor] = {}

    def encode_labels(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """(C, D) label embeddings, averaged over templates; cached per (labels, templates)."""
        templates = list(templates) if templates else self.templates
        key = (tuple(labels), tuple(templates) if templates else None)
        if key not in self._label_cache:
            if templates:
                for template in templates:
                    if "{}" not in template:
                        raise ValueError(f"template {template!r} has no '{{}}' where the label goes")
                prompts = [t.format(label) for label in labels for t in templates]
                embeds = encode_texts(self.model, prompts, device=self.device)  # (C*T, D)
                embeds = embeds.view(len(labels), len(templates), -1).mean(dim=1)  # (C, D)
                embeds = torch.nn.functional.normalize(embeds, dim=-1)
            else:
                embeds = encode_texts(self.model, list(labels), device=self.device)
            self._label_cache[key] = embeds
        return self._label_cache[key]

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """(N, D) normalised embeddings of paths, PIL images or uint8 arrays."""
        pixels = torch.stack([self.transform(to_array(image)) for image in images]).to(self.device)
        return self.model.encode_image(pixels)

    @torch.no_grad()
    def predict(self, image: ImageInput | Sequence[ImageInput], labels: Sequence[str], top_k: int | None = None,
                templates: Sequence[str] | None = None):
        """Classifies one image, or a list of images, among `labels`.

        Returns:
            [(label, probability), ...] sorted by probability (softmax over all labels of the scaled cosine
            similarities), at most top_k of them; for a list of images, a list of such lists.
        """
        labels = list(labels)
        if len(labels) < 2:
            raise ValueError(f"predict needs at least 2 labels to choose between, got {labels}")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        if not images:
            raise ValueError("no images given")
        label_embeds = self.encode_labels(labels, templates)  # (C, D)
        image_embeds = self.encode_images(images)  # (N, D)
        probs = (self.model.scale() * image_embeds @ label_embeds.t()).softmax(dim=-1).cpu()  # (N, C)
        k = len(labels) if top_k is None else max(1, min(top_k, len(labels)))
        results = []
        for row in probs:
            values, indices = row.topk(k)
            results.append([(labels[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())])
        return results[0] if single else results


def to_array(image: ImageInput) -> np.ndarray:
    """An RGB uint8 array (H, W, 3) from a path, a PIL image or an array (grayscale and RGBA accepted)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        return load_image(path)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 (0-255), got {image.dtype}")
        return np.ascontiguousarray(image[..., :3])
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, a PIL.Image or a numpy array")


# --------------------------------------------------------------------------------------------------- search


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


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

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.pipeline.model_dir)

    def index(self, source: str | Path | Sequence[str | Path], index_path: str | Path | None = None,
              batch_size: int = 64, show_progress: bool = True) -> int:
        """Indexes every image under a folder, or a list of image files; returns how many were (re-)encoded."""
        from safetensors.torch import load_file, save

        files = list_images(source) if isinstance(source, (str, Path)) else [Path(p) for p in source]
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        fingerprint = self.fingerprint
        previous: dict[str, tuple[list, torch.Tensor]] = {}
        if index_path is not None and Path(index_path).is_file():
            meta, embeds = _read_index(Path(index_path), load_file)
            if meta.get("model") == fingerprint:
                previous = {e["path"]: (e["stamp"], embeds[i]) for i, e in enumerate(meta["files"])}
        keys = [str(p.resolve()) for p in files]
        stamps = {key: [stat.st_size, stat.st_mtime_ns] for key, stat in zip(keys, (p.stat() for p in files))}
        todo = [i for i, key in enumerate(keys) if previous.get(key, (None,))[0] != stamps[key]]
        embeddings = {key: embedding for key, (_, embedding) in previous.items()}
        if todo:
            fresh = encode_image_files(self.pipeline.model, [files[i] for i in todo], batch_size,
                                       self.pipeline.device, show_progress=show_progress)
            embeddings.update({keys[i]: fresh[j] for j, i in enumerate(todo)})
        self.paths = [Path(key) for key in keys]
        self.embeddings = torch.stack([embeddings[key] for key in keys]).cpu()
        if index_path is not None:
            meta = {"model": fingerprint, "files": [{"path": key, "stamp": stamps[key]} for key in keys]}
            atomic_write_bytes(index_path, save({"embeddings": self.embeddings.contiguous()},
                                                metadata={"liteclip_index": json.dumps(meta)}))
        logger.info("indexed %d images (%d encoded, %d reused)", len(files), len(todo), len(files) - len(todo))
        return len(todo)

    def load(self, index_path: str | Path) -> None:
        from safetensors.torch import load_file

        meta, embeds = _read_index(Path(index_path), load_file)
        if meta.get("model") != self.fingerprint:
            raise ValueError(f"index {index_path} was built with another model; re-run `liteclip index`")
        self.paths = [Path(e["path"]) for e in meta["files"]]
        self.embeddings = embeds

    def _rank(self, query_embed: torch.Tensor, top_k: int) -> list[tuple[Path, float]]:
        if not self.paths:
            raise ValueError("the index is empty: call index(folder) or load(index_path) first")
        scores = self.embeddings.to(query_embed.device) @ query_embed  # (N,)
        values, indices = scores.topk(min(top_k, len(self.paths)))
        return [(self.paths[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def search(self, query: str, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images for a text query, with cosine similarities."""
        return self._rank(encode_texts(self.pipeline.model, [query], device=self.pipeline.device)[0].cpu(), top_k)

    def similar(self, image: ImageInput, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images most similar to `image`."""
        return self._rank(self.pipeline.encode_images([image])[0].cpu(), top_k)


def _read_index(path: Path, load_file) -> tuple[dict, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("liteclip_index", "{}"))
    return meta, load_file(str(path))["embeddings"]


# ------------------------------------------------------------------------------------------------ evaluation


def image_folder_classes(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageFolder layout: root/<class name>/*.jpg -> (class names, [(path, class index), ...])."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = [(p, i) for i, name in enumerate(classes) for p in list_images(root / name)]
    if len(classes) < 2 or not samples:
        raise ValueError(f"{root} needs at least two class folders with images (root/<class name>/*.jpg)")
    return classes, samples


def evaluate_zero_shot(pipeline: ZeroShotPipeline, root: str | Path, templates: Sequence[str] | None = None,
                       batch_size: int = 64, show_progress: bool = True) -> dict[str, Any]:
    """Zero-shot top-1/top-5 accuracy on an ImageFolder directory, with a per-class table.

    Class names come from folder names ("_" read as a space) and are formatted into the templates.
    """
    classes, samples = image_folder_classes(root)
    labels = [name.replace("_", " ") for name in classes]
    class_embeds = pipeline.encode_labels(labels, templates)
    image_embeds = encode_image_files(pipeline.model, [p for p, _ in samples], batch_size, pipeline.device,
                                      show_progress=show_progress)
    targets = torch.tensor([c for _, c in samples])
    result: dict[str, Any] = zero_shot_accuracy(image_embeds, class_embeds.to(image_embeds.device), targets,
                                                ks=(1, min(5, len(classes))))
    predictions = (image_embeds @ class_embeds.t().to(image_embeds.device)).argmax(dim=1).cpu()
    result["per_class"] = {labels[c]: {"count": int((targets == c).sum()),
                                       "top1": 100.0 * float((predictions[targets == c] == c).float().mean())}
                           for c in range(len(classes)) if (targets == c).any()}
    return result


def evaluate_retrieval(model: CLIP, images: list[CaptionedImage], batch_size: int = 64,
                       device: torch.device | str = "cpu", show_progress: bool = True) -> dict[str, float]:
    """Retrieval recall R@1/5/10 both ways of a model on a captioned split (all captions of each image)."""
    if not images:
        raise ValueError("the split has no images")
    image_embeds = encode_image_files(model, [im.image_path for im in images], batch_size, device,
                                      show_progress=show_progress)
    captions = [c for im in images for c in im.captions]
    owners = torch.tensor([i for i, im in enumerate(images) for _ in im.captions])
    text_embeds = encode_texts(model, captions, batch_size, device)
    return retrieval_recall(image_embeds.cpu(), text_embeds.cpu(), owners)


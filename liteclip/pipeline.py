"""Using a trained model: zero-shot classification, and text-to-image and image-to-image search.

    pipeline = ZeroShotPipeline()                      # loads ./model
    pipeline.predict("cat.jpg", ["a photo of a dog", "a photo of a cat"])  -> [("a photo of a cat", 0.93), ...]

This is library code: it imports the model, the embedding functions and the eval transform, never the trainer.
Evaluation lives in liteclip.evaluation.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from liteclip.checkpoint import file_stamp, sha256_of
from liteclip.data.captions import BadRow
from liteclip.data.images import load_image, to_rgb, unreadable
from liteclip.data.image_folder import IMAGE_SUFFIXES, list_images
from liteclip.data.transforms import eval_transform
from liteclip.embedding import (batches_with_progress, encode_decodable_image_files, encode_labels, encode_texts,
                                image_file_loader)
from liteclip.errors import DataError, InputError, ModelLoadError, NonFiniteError
from liteclip.model import CLIP
from liteclip.pretrained import WEIGHTS_NAME
from liteclip.query import QueryTerm, parse_query
from liteclip.search_index import (Entries, IndexedFile, PartialIndex, derived_folders, entries_of, faiss_module,
                                   faiss_path, open_faiss, read_index, write_faiss, write_index)

logger = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, np.ndarray]
LABEL_CACHE_SIZE = 64


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


class SearchView(NamedTuple):
    """What a search reads, replaced whole (one assignment), so a query running while index() works sees either the
    state before or the state after a chunk, never half of each."""

    paths: list[Path]  # one per distinct content: the first of its files
    embeddings: torch.Tensor  # (N, D); empty when a FAISS copy stands in for them
    faiss_index: Any | None
    ids: list[str]  # the content hash, shortened: stable across renames and re-indexing
    stamps: list[list[int]]  # each path's [size, mtime_ns] when indexed: a file changed since is not served as it


def nearest(view: SearchView, query_embed: torch.Tensor, k: int) -> list[tuple[Path, float]]:
    if view.faiss_index is not None:
        scores, rows = view.faiss_index.search(query_embed.float()[None].numpy(), k)
        values, indices = scores[0], rows[0]
    else:
        values, indices = (view.embeddings.to(query_embed.device) @ query_embed).topk(k)  # scores: (N,)
    return [(view.paths[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]


def content_groups(keys: list[str], hashes: dict[str, str], known: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Content -> its files, in listing order (the first stands for it), for every content with an embedding."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if hashes[key] in known:
            groups.setdefault(hashes[key], []).append(key)
    return groups


def view_of(keys: list[str], hashes: dict[str, str], known: dict[str, torch.Tensor],
            stamps: dict[str, list[int]]) -> SearchView:
    groups = content_groups(keys, hashes, known)
    embeddings = torch.stack([known[sha] for sha in groups]).cpu() if groups else torch.empty(0)
    return SearchView([Path(group[0]) for group in groups.values()], embeddings, None, [sha[:16] for sha in groups],
                      [stamps[group[0]] for group in groups.values()])


def first_of_each_new_content(keys: list[str], hashes: dict[str, str], known: dict[str, torch.Tensor]) -> list[str]:
    """One file per content not seen before: a renamed, moved or copied photo is never encoded again."""
    todo, queued = [], set()
    for key in keys:
        if hashes[key] not in known and hashes[key] not in queued:
            queued.add(hashes[key])
            todo.append(key)
    return todo


def readable_stamps(files: list[Path]) -> tuple[dict[str, Path], dict[str, list[int]], list[BadRow]]:
    """Each file by its key (its resolved path), and its [size, mtime_ns]; a file gone or unreadable since it was
    listed is skipped with the reason, not an error that stops the run."""
    paths, stamps, skipped = {}, {}, []
    for path in files:
        try:
            key = str(path.resolve())
            stamps[key] = file_stamp(path)
        except OSError as error:
            skipped.append(BadRow(path, 0, unreadable(path, error).reason))
            continue
        paths[key] = path
    return paths, stamps, skipped


def content_hashes(keys: list[str], stamps: dict[str, list], previous: Entries
                   ) -> tuple[dict[str, str], dict[str, torch.Tensor], list[BadRow]]:
    """Each file's SHA-256 (read again only when its stamp changed), the embeddings already known by content (an
    older index without hashes still lends its embeddings to files whose stamp has not changed), and the files that
    could not be read (skipped, with the reason)."""
    hashes, known, skipped = {}, {}, []
    for key in keys:
        entry = previous.get(key)
        unchanged = entry is not None and entry.stamp == stamps[key]
        try:
            hashes[key] = entry.sha256 if unchanged and entry.sha256 else sha256_of(key)
        except OSError as error:
            skipped.append(BadRow(Path(key), 0, unreadable(Path(key), error).reason))
            continue
        if unchanged:
            known[hashes[key]] = entry.embedding
    known.update({entry.sha256: entry.embedding for entry in previous.values() if entry.sha256})
    return hashes, known, skipped


def unique_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The paths as Path objects, each file once (the first mention of it kept, in order)."""
    paths = [Path(path) for path in paths]
    seen: set[Path] = set()
    unique = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    if len(unique) < len(paths):
        logger.info("%d repeated path(s) indexed once", len(paths) - len(unique))
    return unique


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


# --------------------------------------------------------------------------------------------------- search


class ImageSearch:
    """Text-to-image and image-to-image search over an indexed folder.

    The index (liteclip.search_index: embeddings as safetensors, with the file list, each file's size and mtime, and
    the model's fingerprint) is saved next to nothing else: re-indexing encodes only new or changed files, and an
    index made by another model is rebuilt rather than mixed. Indexing writes what it has encoded every
    `chunk_size` images, so a stopped run loses at most one chunk. With faiss-cpu installed, a FAISS copy is written
    too and `load` searches it memory-mapped instead of reading the embeddings into memory (same results: flat
    inner-product search is exact).
    """

    def __init__(self, pipeline: ZeroShotPipeline):
        self.pipeline = pipeline
        self.view = SearchView([], torch.empty(0), None, [], [])
        self.skipped: list[BadRow] = []  # files the last index() call could not decode
        self.progress = {"done": 0, "total": 0}  # images encoded by a running index() call, and how many it has

    @property
    def paths(self) -> list[Path]:
        return self.view.paths

    @property
    def embeddings(self) -> torch.Tensor:
        return self.view.embeddings

    @property
    def faiss_index(self) -> Any | None:
        """The index's FAISS copy, memory-mapped, when load() found a usable one (None: the embeddings are searched)."""
        return self.view.faiss_index

    @property
    def ids(self) -> list[str]:
        """A stable id per indexed image (its content hash, shortened): the same across renames and re-indexing."""
        return self.view.ids

    @cached_property
    def fingerprint(self) -> str:
        """The model's weights' hash, read once: an index made by another model is never mixed with this one's."""
        return model_fingerprint(self.pipeline.model_dir)

    def indexed_file(self, identifier: str) -> tuple[Path, list[int]] | None:
        """The file and [size, mtime_ns] stamp the indexed image with this id was indexed from (None: no such id)."""
        view = self.view
        identifier = identifier.lower() if isinstance(identifier, str) else None
        if identifier not in view.ids:
            return None
        row = view.ids.index(identifier)
        return view.paths[row], view.stamps[row]

    def ids_of(self, paths: Sequence[Path]) -> list[str | None]:
        """The id of each indexed path (None for a path that is not, or no longer, in the index)."""
        view = self.view
        ids = dict(zip(view.paths, view.ids))
        return [ids.get(Path(path)) for path in paths]

    def index(self, source: str | Path | Sequence[str | Path], index_path: str | Path | None = None,
              batch_size: int = 64, show_progress: bool = True, num_workers: int = 0, chunk_size: int = 4096,
              faiss: bool | None = None) -> int:
        """Indexes every image under a folder, or a list of image files; returns how many were (re-)encoded.

        faiss: write the FAISS copy (None: when faiss-cpu is installed).
        """
        own_folders = derived_folders(Path(index_path)) if index_path is not None else []  # its thumbnails, chunks
        files = (list_images(source, exclude=own_folders) if isinstance(source, (str, Path))
                 else unique_paths(source))
        if index_path is not None and Path(index_path).suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"the index path {index_path} names an image file; give the index a name of its own, "
                             f"such as photos.index (nothing was written)")
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        if faiss and faiss_module() is None:
            raise InputError("faiss=True needs faiss-cpu: pip install 'liteclip[search]'")
        fingerprint = self.fingerprint
        index_path = Path(index_path) if index_path is not None else None
        partial = PartialIndex(index_path) if index_path is not None else None
        previous = self._previous_entries(index_path, fingerprint) if index_path is not None else {}
        listed, stamps, self.skipped = readable_stamps(files)
        hashes, known, unreadable_files = content_hashes(list(listed), stamps, previous)
        self.skipped += unreadable_files  # not indexed, so the next run tries them again
        keys = [key for key in listed if key in hashes]
        todo = first_of_each_new_content(keys, hashes, known)
        self.view = view_of(keys, hashes, known, stamps)  # what is searchable already, while the rest is encoded
        encoded = self._encode(todo, keys, listed, stamps, hashes, known, partial, batch_size, num_workers,
                               chunk_size, show_progress)
        groups = content_groups(keys, hashes, known)
        if not groups:
            first = f" (first: {self.skipped[0]})" if self.skipped else ""
            raise DataError(f"none of the {len(files)} images in {source} decodes{first}")
        if index_path is not None:
            meta = {"model": fingerprint, "files": [
                {"path": group[0], "stamp": stamps[group[0]], "sha256": sha,
                 "duplicates": [{"path": key, "stamp": stamps[key]} for key in group[1:]]}
                for sha, group in groups.items()]}
            if faiss or (faiss is None and faiss_module() is not None):
                meta["faiss"] = write_faiss(index_path, self.embeddings)
            write_index(index_path, self.embeddings, meta)
            partial.remove()
        logger.info("indexed %d images, %d distinct (%d encoded, %d reused, %d skipped)",
                    sum(map(len, groups.values())), len(groups), encoded, len(keys) - len(todo), len(self.skipped))
        return encoded

    def _encode(self, todo: list[str], keys: list[str], listed: dict[str, Path], stamps: dict[str, list[int]],
                hashes: dict[str, str], known: dict[str, torch.Tensor], partial: PartialIndex | None,
                batch_size: int, num_workers: int, chunk_size: int, show_progress: bool) -> int:
        """Encodes the files `todo` names a chunk at a time (each chunk saved to `partial` and made searchable as it
        is done), filling `hashes` and `known`; returns how many were encoded."""
        self.progress = {"done": 0, "total": len(todo)}
        encoded = 0
        with tqdm(total=len(todo), desc="indexing", unit="img", disable=not show_progress or not todo) as progress:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start:start + chunk_size]
                # each file is hashed again from the bytes it is decoded from: one changed since the hashing above
                # is filed under its new content, never its old content with the new one's embedding
                fresh = encode_decodable_image_files(self.pipeline.model, [listed[key] for key in chunk], batch_size,
                                                     self.pipeline.device, num_workers=num_workers, progress=progress,
                                                     hash_content=True)
                entries = {}
                for row, j in enumerate(fresh.kept):
                    key = chunk[j]
                    hashes[key] = fresh.sha256[row]
                    entries[key] = IndexedFile(stamps[key], fresh.embeds[row].cpu(), hashes[key])
                if partial is not None:
                    partial.append(self.fingerprint, entries)
                known.update({entry.sha256: entry.embedding for entry in entries.values()})
                encoded += len(entries)
                self.skipped += fresh.skipped  # not indexed, so the next run tries them again
                self.progress = {"done": min(start + chunk_size, len(todo)), "total": len(todo)}
                self.view = view_of(keys, hashes, known, stamps)  # one assignment: the old view or this one
        return encoded

    @staticmethod
    def _previous_entries(index_path: Path, fingerprint: str) -> Entries:
        """Embeddings an earlier index of the same model holds, and those an unfinished run left in chunks."""
        previous = {}
        if index_path.exists() and not index_path.is_file():
            raise InputError(f"the index path {index_path} is a folder; give the index a file name of its own, such "
                             f"as photos.index (nothing was written)")
        if index_path.is_file():
            try:
                meta, embeddings = read_index(index_path)
            except ModelLoadError:  # the user's own file of that name, or a damaged index: never written over
                raise InputError(f"{index_path} exists and is not a liteclip search index, so it is left as it is "
                                 f"and nothing was written; give --index another name (or, if it is a damaged "
                                 f"index of yours, delete it and index again)") from None
            if meta.get("model") == fingerprint:
                previous = entries_of(meta, embeddings)
        previous.update(PartialIndex(index_path).entries(fingerprint))
        return previous

    def load(self, index_path: str | Path) -> None:
        """Opens an index for search: its FAISS copy memory-mapped when there is one and faiss is installed, the
        embeddings read into memory otherwise."""
        index_path = Path(index_path)
        if index_path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"{index_path} is an image file, not an index; pass the file `liteclip index` wrote "
                             f"(--index NAME)")
        # the header is parsed once; the embeddings are read with it unless a FAISS copy may stand in for them
        faiss_copy = faiss_module() is not None and faiss_path(index_path).is_file()
        meta, embeddings = read_index(index_path, embeddings=not faiss_copy)
        if meta.get("model") != self.fingerprint:
            raise InputError(f"index {index_path} was built with another model; re-run `liteclip index`")
        paths = [Path(e["path"]) for e in meta["files"]]
        ids = [e["sha256"][:16] if e.get("sha256") else str(row) for row, e in enumerate(meta["files"])]
        faiss_index = open_faiss(index_path, meta)
        if faiss_index is None:  # no FAISS copy, or a stale one: search the embeddings themselves
            embeddings = embeddings if embeddings is not None else read_index(index_path)[1]
        self.view = SearchView(paths, torch.empty(0) if faiss_index is not None else embeddings, faiss_index, ids,
                               [e.get("stamp") for e in meta["files"]])

    def _rank(self, query_embed: torch.Tensor, top_k: int) -> list[tuple[Path, float]]:
        """The top_k existing files: one deleted since indexing is passed over (with a warning) for the next."""
        if top_k < 1:
            raise InputError(f"top_k={top_k}: ask for at least one image")
        view = self.view  # one consistent state, whatever a running index() publishes meanwhile
        if not view.paths:
            raise InputError("the index is empty: call index(folder) or load(index_path) first")
        k = min(top_k, len(view.paths))
        while True:
            hits = nearest(view, query_embed, k)
            found = [(path, score) for path, score in hits if path.is_file()][:top_k]
            if len(found) == top_k or k == len(view.paths):
                break
            k = min(len(view.paths), 2 * k)
        last = hits.index(found[-1]) if found else len(hits) - 1
        gone = [path for path, _ in hits[:last + 1] if not path.is_file()]
        if gone:
            logger.warning("%d indexed file(s) among the nearest no longer exist (first: %s) and were passed over; "
                           "re-run `liteclip index` to drop them", len(gone), gone[0])
        return found

    def search(self, query: str, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images for a text query, with cosine similarities."""
        return self._rank(encode_texts(self.pipeline.model, [query], device=self.pipeline.device)[0].cpu(), top_k)

    def similar(self, image: ImageInput, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images most similar to `image`."""
        return self._rank(self.pipeline.encode_images([image])[0].cpu(), top_k)

    def query(self, query: str | Sequence[QueryTerm], top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images for a weighted query (liteclip.query): `2:golden retriever + ./pool.jpg -
        grass` adds twice the text's embedding and the image's and takes away the other text's. A string is read
        as the command line reads it (image files by path); the web page passes parse_web_query's terms, whose
        images are indexed ones, by id."""
        terms = parse_query(query) if isinstance(query, str) else list(query)
        texts = [term.text for term in terms if term.text is not None]
        images = [term.image for term in terms if term.image is not None]
        text_embeds = iter(encode_texts(self.pipeline.model, texts, device=self.pipeline.device).cpu() if texts
                           else [])
        image_embeds = iter(self.pipeline.encode_images(images).cpu() if images else [])

        def embedding(term: QueryTerm) -> torch.Tensor:
            if term.text is not None:
                return next(text_embeds)
            return next(image_embeds) if term.image is not None else self.indexed_embedding(term.indexed).cpu()

        # weights are scaled by the largest first: the direction is the same, and 1e300 * an embedding overflows
        largest = max(abs(term.weight) for term in terms)
        combined = sum((term.weight / largest) * embedding(term) for term in terms)
        if not torch.isfinite(combined).all():
            raise NonFiniteError(f"the model in {self.pipeline.model_dir} gives embeddings that are not finite (NaN "
                                 f"or infinity) for this query: its weights have diverged")
        if combined.norm() < 1e-6:
            raise InputError("the query's terms cancel each other out (their weighted sum is zero); change a weight "
                             "or a term")
        return self._rank(torch.nn.functional.normalize(combined, dim=-1), top_k)

    def indexed_embedding(self, identifier: str | None) -> torch.Tensor:
        """(D,) the embedding of the indexed image with this id; an unknown id is an InputError."""
        view = self.view
        identifier = identifier.lower() if isinstance(identifier, str) else identifier
        if identifier not in view.ids:
            raise InputError(f"no indexed image {identifier!r}")
        row = view.ids.index(identifier)
        if view.faiss_index is not None:
            return torch.from_numpy(view.faiss_index.reconstruct(row)).float()
        return view.embeddings[row].float()

    def similar_to_indexed(self, identifier: str, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images most similar to the indexed image with this id (itself first)."""
        return self._rank(self.indexed_embedding(identifier), top_k)

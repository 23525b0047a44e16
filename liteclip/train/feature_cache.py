"""Locked image tower: its features computed once per image and kept on disk, so later epochs and later runs skip the
tower (LiT-style training on a laptop). `train.cache_image_features: true` turns it on.

Cached features live in `data.root/.liteclip_cache/` as safetensors, keyed by tower name, tower weights, eval
transform, precision and the exact files and their contents: anything that would change a feature changes the key.
A damaged cache file is computed again.

Augmentation survives the cache (MobileCLIP's stored augmentations): with `train.cached_views: K` > 1, each training
image is encoded K times through the training transform, view v of image i with its own fixed seed, and each epoch
every sample takes one of its K views at random (from the sample's seed, so resume stays exact). Validation and test
are always cached once, through the evaluation transform.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save
from torch.utils.data import DataLoader

from liteclip.files import atomic_write_bytes, digest_tensors, read_safetensors, sha256_of
from liteclip.data.captions import CaptionedImage, ImageCaptionDataset, unpack_sample_key
from liteclip.data.images import UndecodableImageError, load_image
from liteclip.data.transforms import decode_side
from liteclip.embedding import encode_image_files, stack_decoded
from liteclip.errors import ConfigError, ModelLoadError
from liteclip.model import CLIP
from liteclip.precision import Precision

logger = logging.getLogger(__name__)


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Samples carrying precomputed image-tower features instead of pixels (same contract otherwise)."""

    def __init__(self, dataset: ImageCaptionDataset, features: torch.Tensor):
        self.dataset = dataset  # its images, caption mode and pairs are reused
        self.features = features  # (N_images, F), or (K views, N_images, F) for augmented views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = unpack_sample_key(key)
        image_index, caption_index = self.dataset.locate(index, generator)
        if self.features.ndim == 3:  # one of the image's augmented views, drawn from the sample's own seed
            features = self.features[int(torch.randint(self.features.shape[0], (), generator=generator)), image_index]
        else:
            features = self.features[image_index]
        return {"image_features": features,
                "caption": self.dataset.images[image_index].captions[caption_index], "image_index": image_index,
                "caption_index": caption_index}

    @property
    def images(self) -> list[CaptionedImage]:
        return self.dataset.images


def feature_cache_key(model: CLIP, paths: list[Path], precision: Precision) -> str:
    """Identifies cached features: tower name, tower weights, eval transform, precision and the exact files (path
    and content)."""
    digest = hashlib.sha256()
    digest.update(model.config.image.name.encode())
    digest.update(str(precision.dtype).encode())  # bf16 features (an AMX CPU, a GPU) are not fp32 ones
    digest.update(json.dumps(model.data_config, sort_keys=True, default=str).encode())
    digest_tensors(digest, model.image_encoder.state_dict())
    # each file by its bytes, not its size and time, which a copy or a swap of two files can keep while the pictures
    # change; reading the files costs far less than running the tower over them
    for path in paths:
        digest.update(f"{path}:{sha256_of(path)}".encode())
    return digest.hexdigest()[:20]


def read_cached(path: Path) -> torch.Tensor | None:
    """The features in a cache file, or None (with a warning) when there is none or it is damaged: it is computed
    again and replaced."""
    if not path.is_file():
        return None
    try:
        return read_safetensors(path, "cached image features")[0]["features"]
    except (ModelLoadError, KeyError) as error:
        logger.warning("the feature cache %s is damaged (%s); computing the features again", path,
                       str(error).split(";")[0])
        return None


@torch.no_grad()
def cached_image_features(model: CLIP, paths: list[Path], cache_dir: Path, device: torch.device,
                          precision: Precision, num_workers: int = 0) -> torch.Tensor:
    """(N, F) locked-tower features for image files, computed once and kept in cache_dir as safetensors."""
    path = cache_dir / f"image_features_{feature_cache_key(model, paths, precision)}.safetensors"
    cached = read_cached(path)
    if cached is not None:
        logger.info("image features from cache %s", path)
        return cached
    model.eval()
    features = encode_image_files(model, paths, 64, device, precision.autocast, show_progress=True,
                                  num_workers=num_workers, tower_features=True).cpu()
    atomic_write_bytes(path, save({"features": features.contiguous()}))
    logger.info("cached %d image features in %s", len(paths), path)
    return features


class AugmentedViews(torch.utils.data.Dataset):
    """Item v * N + i: view v of image i through the training transform, seeded by (v, i) alone."""

    def __init__(self, paths: list[Path], views: int, transform: Callable, decode_size: int | None):
        self.paths, self.views, self.transform, self.decode_size = paths, views, transform, decode_size

    def __len__(self) -> int:
        return self.views * len(self.paths)

    def __getitem__(self, item: int) -> dict[str, Any]:
        view, index = divmod(item, len(self.paths))
        try:
            pixels = load_image(self.paths[index], self.decode_size)
        except UndecodableImageError as error:
            return {"index": item, "error": error.reason}
        return {"index": item, "pixel_values": self.transform(pixels, view_seed(view, index))}


def view_seed(view: int, index: int) -> int:
    """The augmentation seed of view `view` of image `index`: the same in every run, so the cache key holds."""
    return (view * 1_000_003 + index) % (2**31 - 1)


@torch.no_grad()
def cached_augmented_features(model: CLIP, paths: list[Path], views: int, transform: Callable,
                              transform_key: str, cache_dir: Path, device: torch.device, precision: Precision,
                              num_workers: int = 0) -> torch.Tensor:
    """(views, N, F) locked-tower features of `views` augmented views of each image file, computed once."""
    key = hashlib.sha256(f"{feature_cache_key(model, paths, precision)}:{views}:{transform_key}".encode())
    path = cache_dir / f"image_views_{key.hexdigest()[:20]}.safetensors"
    cached = read_cached(path)
    if cached is not None:
        logger.info("%d augmented views per image from cache %s", views, path)
        return cached
    model.eval()
    dataset = AugmentedViews(paths, views, transform, decode_side(model.data_config))
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers, collate_fn=stack_decoded)
    features = encode_image_files(model, [paths[i % len(paths)] for i in range(len(dataset))], 64, device,
                                  precision.autocast, show_progress=True, tower_features=True, loader=loader)
    features = features.cpu().reshape(views, len(paths), -1)
    atomic_write_bytes(path, save({"features": features.contiguous()}))
    logger.info("cached %d augmented views of %d images in %s", views, len(paths), path)
    return features


def check_views_fit(views: int, num_images: int, width: int) -> None:
    """The views are held in memory for the whole run: refuse a K whose features would take over half of it."""
    needed = views * num_images * width * 4
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    if needed > budget:
        raise ConfigError(f"train.cached_views={views} needs {needed / 2**30:.1f} GiB of features ({num_images} "
                          f"training images x {width} floats x {views} views), more than half of this machine's "
                          f"{2 * budget / 2**30:.0f} GiB memory; lower train.cached_views to at most "
                          f"{max(1, budget // (num_images * width * 4))}")


def use_feature_cache(model: CLIP, datasets: dict[str, ImageCaptionDataset], cache_dir: Path,
                      device: torch.device, precision: Precision, num_workers: int = 0, views: int = 1,
                      transform_key: str = "") -> dict[str, CachedFeatureDataset]:
    """Swaps every split's images for cached features; later epochs and later runs skip the image tower. With
    views > 1, the training split's are `views` augmented views per image through its own training transform
    (`transform_key` names that transform's settings for the cache key)."""
    if not model.config.image.locked:
        raise ConfigError("train.cache_image_features needs model.image.tune: locked (model.image.locked: true in "
                          "older configs): the features of a tower that trains change every step")
    swapped = {}
    for split, dataset in datasets.items():
        paths = [image.image_path for image in dataset.images]
        if not paths:
            features = torch.empty(0)
        elif split == "train" and views > 1:
            check_views_fit(views, len(paths), model.image_encoder.num_features)
            features = cached_augmented_features(model, paths, views, dataset.transform, transform_key, cache_dir,
                                                 device, precision, num_workers)
        else:
            features = cached_image_features(model, paths, cache_dir, device, precision, num_workers)
        swapped[split] = CachedFeatureDataset(dataset, features)
    return swapped

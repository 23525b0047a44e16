"""Locked image tower: its features computed once per image and kept on disk, so later epochs and later runs skip the
tower (LiT-style training on a laptop). `train.cache_image_features: true` turns it on.

Cached features live in `data.root/.liteclip_cache/` as safetensors, keyed by tower name, tower weights, eval
transform, precision and the exact file list: anything that would change a feature changes the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from liteclip.checkpoint import atomic_write_bytes, digest_tensors
from liteclip.data.captions import CaptionedImage, ImageCaptionDataset, unpack_sample_key
from liteclip.embedding import encode_image_files
from liteclip.errors import ConfigError
from liteclip.model import CLIP
from liteclip.precision import Precision

logger = logging.getLogger(__name__)


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Samples carrying precomputed image-tower features instead of pixels (same contract otherwise)."""

    def __init__(self, dataset: ImageCaptionDataset, features: torch.Tensor):
        self.dataset = dataset  # its images, caption mode and pairs are reused
        self.features = features  # (N_images, F)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = unpack_sample_key(key)
        image_index, caption_index = self.dataset.locate(index, generator)
        return {"image_features": self.features[image_index],
                "caption": self.dataset.images[image_index].captions[caption_index], "image_index": image_index,
                "caption_index": caption_index}

    @property
    def images(self) -> list[CaptionedImage]:
        return self.dataset.images


def feature_cache_key(model: CLIP, paths: list[Path], precision: Precision) -> str:
    """Identifies cached features: tower name, tower weights, eval transform, precision and the exact files
    (path, size, modification time)."""
    digest = hashlib.sha256()
    digest.update(model.config.image.name.encode())
    digest.update(str(precision.dtype).encode())  # bf16 features (an AMX CPU, a GPU) are not fp32 ones
    digest.update(json.dumps(model.data_config, sort_keys=True, default=str).encode())
    digest_tensors(digest, model.image_encoder.state_dict())
    for path in paths:  # a file rewritten under the same name (a regenerated demo) gets new features
        stat = Path(path).stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def cached_image_features(model: CLIP, paths: list[Path], cache_dir: Path, device: torch.device,
                          precision: Precision, num_workers: int = 0) -> torch.Tensor:
    """(N, F) locked-tower features for image files, computed once and kept in cache_dir as safetensors."""
    path = cache_dir / f"image_features_{feature_cache_key(model, paths, precision)}.safetensors"
    if path.is_file():
        logger.info("image features from cache %s", path)
        return load_file(str(path))["features"]
    model.eval()
    features = encode_image_files(model, paths, 64, device, precision.autocast, show_progress=True,
                                  num_workers=num_workers, tower_features=True).cpu()
    atomic_write_bytes(path, save({"features": features.contiguous()}))
    logger.info("cached %d image features in %s", len(paths), path)
    return features


def use_feature_cache(model: CLIP, datasets: dict[str, ImageCaptionDataset], cache_dir: Path,
                      device: torch.device, precision: Precision,
                      num_workers: int = 0) -> dict[str, CachedFeatureDataset]:
    """Swaps every split's images for cached features; later epochs and later runs skip the image tower."""
    if not model.config.image.locked:
        raise ConfigError("train.cache_image_features needs model.image.tune: locked (model.image.locked: true in "
                          "older configs): the features of a tower that trains change every step")
    swapped = {}
    for split, dataset in datasets.items():
        paths = [image.image_path for image in dataset.images]
        features = cached_image_features(model, paths, cache_dir, device, precision, num_workers) \
            if paths else torch.empty(0)
        swapped[split] = CachedFeatureDataset(dataset, features)
    return swapped

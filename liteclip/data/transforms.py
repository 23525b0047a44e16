"""Image transforms with albumentations, built from the image tower's timm data config.

Input size, mean, std, interpolation and crop_pct come from the tower (timm.data.resolve_model_data_config), so an
ImageNet-normalised ConvNeXt and a CLIP-normalised ViT each get their own statistics without a line of YAML.
Horizontal flip is off by default: captions say "left" and "right".
"""

from __future__ import annotations

import os
from typing import Any, Callable

# albumentations asks PyPI for its newest version on import: on an offline cluster node that is a warning in every
# process, and a wait for a network timeout. A user who sets the variable themselves keeps their choice.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
import numpy as np
import torch

INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
                 "area": cv2.INTER_AREA}


class Transform:
    """An albumentations pipeline as a callable: uint8 array (H, W, 3) -> float tensor (3, H, W).

    Albumentations keeps its own RNG, seeded from the OS; a random pipeline is reseeded on every call, from `seed`
    when the caller has one (the training sampler gives each sample its own) or else from torch's RNG, so
    augmentations repeat with the run's seed.
    """

    def __init__(self, pipeline: A.Compose, random: bool = False):
        self.pipeline = pipeline
        self.random = random

    def __call__(self, image: np.ndarray, seed: int | None = None) -> torch.Tensor:
        if self.random:
            self.pipeline.set_random_seed(seed if seed is not None else int(torch.randint(2**31 - 1, ())))
        image = self.pipeline(image=image)["image"]  # (H, W, 3) float32, normalised
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def image_size(data_config: dict[str, Any]) -> int:
    return int(data_config["input_size"][-1])


def eval_transform(data_config: dict[str, Any]) -> Transform:
    """Resize the shorter side to size / crop_pct, then center crop (timm's evaluation recipe). open_clip
    checkpoints may ask otherwise (data_config["resize_mode"]): `squash` resizes to a square whatever the aspect,
    `longest` fits the longer side and pads the rest black, as open_clip does for them."""
    size = image_size(data_config)
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    interpolation = INTERPOLATION.get(data_config.get("interpolation", "bicubic"), cv2.INTER_CUBIC)
    resize_mode = data_config.get("resize_mode", "shortest")
    if resize_mode == "squash":
        resize = [A.Resize(height=size, width=size, interpolation=interpolation)]
    elif resize_mode == "longest":
        resize = [A.LongestMaxSize(max_size=size, interpolation=interpolation),
                  A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0)]
    else:
        resize = [A.SmallestMaxSize(max_size=int(round(size / crop_pct)), interpolation=interpolation),
                  A.CenterCrop(height=size, width=size)]
    return Transform(A.Compose([
        *resize, A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0),
    ]))


def train_transform(data_config: dict[str, Any], crop_scale: tuple[float, float] = (0.6, 1.0),
                    horizontal_flip: bool = False, augment: bool = True) -> Transform:
    """Random resized crop and light colour jitter (no hue shift: captions name colours)."""
    if not augment:
        return eval_transform(data_config)
    size = image_size(data_config)
    interpolation = INTERPOLATION.get(data_config.get("interpolation", "bicubic"), cv2.INTER_CUBIC)
    steps: list[Any] = [
        A.RandomResizedCrop(size=(size, size), scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3),
                            interpolation=interpolation),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.0, p=0.8),
    ]
    if horizontal_flip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps.append(A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0))
    return Transform(A.Compose(steps), random=True)


def build_transforms(data_config: dict[str, Any], augment: bool = True, crop_scale: tuple[float, float] = (0.6, 1.0),
                     horizontal_flip: bool = False) -> tuple[Callable, Callable]:
    """(train transform, eval transform) for a tower's data config."""
    return train_transform(data_config, crop_scale, horizontal_flip, augment), eval_transform(data_config)

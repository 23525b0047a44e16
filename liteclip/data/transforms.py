"""Image transforms built from the image tower's data config: the same pixels its own library would give it.

A data config is timm's dictionary (input_size, mean, std, interpolation, crop_pct, crop_mode) with the keys a
checkpoint from elsewhere needs to be preprocessed as its library does:

    resize_with      "pil": PIL's antialiased resize, as timm, open_clip and transformers' PIL processors do;
                     "torchvision": a uint8 tensor resized by torchvision with antialiasing, as transformers'
                     default (torchvision) image processors do; the two differ by a level or two in a few pixels;
                     "opencv": OpenCV without antialiasing, which liteclip used before, kept so that a model saved
                     then predicts as it was trained (a saved model without the key is one of those)
    resize_mode      "shortest" (resize the shorter side, center crop), "squash" (to a square whatever the aspect)
                     or "longest" (fit the longer side, pad the rest), as open_clip names them; timm's crop_mode
                     "squash" and "border" mean the same two
    resize_size      the shorter side before the crop, where a processor says it (transformers' shortest_edge);
                     else floor(size / crop_pct), as timm computes it
    crop_rounding    where an odd surplus puts the crop: "half_even" (torchvision's CenterCrop: round()) or
                     "floor" (transformers)
    fill             the grey level `longest` pads with (open_clip's fill_color; timm's border pads with the mean)

Training crops a random region and resizes it in one antialiased step, with the resize evaluation uses, so a fine
pattern shrunk many times comes out as its mean colour rather than as moire; light colour jitter follows (no hue
shift: captions name colours). Horizontal flip is off by default: captions say "left" and "right".
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

# albumentations asks PyPI for its newest version on import: on an offline cluster node that is a warning in every
# process, and a wait for a network timeout. A user who sets the variable themselves keeps their choice.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
import numpy as np
import torch
from PIL import Image

from liteclip.errors import ConfigError

RESIZERS = ("pil", "torchvision", "opencv")
# the most pixels an image is resized to whole before its center is cut out: past it (only a strip hundreds of
# times longer than wide), just the center is resized
MAX_RESIZED_PIXELS = 1 << 25
DRAFT_MARGIN = 2  # see decode_side
LEGACY_RESIZER = "opencv"  # what a model saved without "resize_with" was trained and evaluated with
PIL_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # the names PIL and torchvision share
OPENCV_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
                        "area": cv2.INTER_AREA}


def image_size(data_config: dict[str, Any]) -> int:
    return int(data_config["input_size"][-1])


def resize_mode(data_config: dict[str, Any]) -> str:
    """shortest, squash or longest, from open_clip's resize_mode or timm's crop_mode."""
    if data_config.get("resize_mode"):
        return data_config["resize_mode"]
    return {"squash": "squash", "border": "longest"}.get(data_config.get("crop_mode") or "center", "shortest")


def resize_side(data_config: dict[str, Any]) -> int:
    """The side the image is resized to before the crop (the shorter side, or the longer one for `longest`)."""
    if data_config.get("resize_size"):
        return int(data_config["resize_size"])
    return math.floor(image_size(data_config) / float(data_config.get("crop_pct") or 1.0))


def decode_side(data_config: dict[str, Any]) -> int:
    """The smallest side a JPEG is draft-decoded to (PIL's reduced-scale DCT decode): twice what the resize needs,
    so PIL's antialiased resize still does the last halving or more. Measured on camera-sized photos, a pretrained
    tower's features then stay above cosine 0.999 of a whole decode (a draft at the side itself: 0.997), at a
    sixth to a ninth of the decoding time (benchmarks/draft_decoding.py)."""
    return DRAFT_MARGIN * max(resize_side(data_config), image_size(data_config))


def resized_shape(height: int, width: int, data_config: dict[str, Any]) -> tuple[int, int]:
    """(height, width) after the evaluation resize, rounded as torchvision, transformers and open_clip round."""
    side, mode = resize_side(data_config), resize_mode(data_config)
    if mode == "squash":
        return side, side
    if mode == "longest":
        ratio = max(height / side, width / side)  # a side that rounds to nothing keeps a pixel (the libraries fail)
        return max(1, round(height / ratio)), max(1, round(width / ratio))
    if width <= height:  # the shorter side to `side`, the longer one truncated
        return int(side * height / width), side
    return side, int(side * width / height)


def resize(image: Image.Image, height: int, width: int, data_config: dict[str, Any],
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The image (or its `box`: left, upper, right, lower) resized to (height, width), antialiased, as uint8 HWC."""
    interpolation = {"area": "box"}.get(data_config.get("interpolation"), data_config.get("interpolation"))
    interpolation = interpolation if interpolation in PIL_FILTERS else "bicubic"  # timm's "random" is for training
    if data_config.get("resize_with", "pil") == "torchvision":
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        tensor = tvF.pil_to_tensor(image)
        if box is not None:
            left, upper, right, lower = (int(round(v)) for v in box)
            tensor = tensor[:, upper:lower, left:right]
        if tuple(tensor.shape[-2:]) != (height, width):
            tensor = tvF.resize(tensor, [height, width], interpolation=InterpolationMode(interpolation),
                                antialias=True)
        return tensor.permute(1, 2, 0).numpy()
    resample = Image.Resampling[interpolation.upper()]
    return np.asarray(image.resize((width, height), resample, box=box))


def crop_offset(surplus: int, rounding: str) -> int:
    """Where a center crop starts when `surplus` pixels are cut away."""
    return int(surplus / 2.0) if rounding == "floor" else int(round(surplus / 2.0))


def crop_or_pad(image: np.ndarray, size: int, rounding: str = "half_even", fill: Any = 0) -> np.ndarray:
    """A size x size center crop, after padding a side shorter than `size` (more of it after than before)."""
    height, width = image.shape[:2]
    if height < size or width < size:
        top, left = max(0, (size - height) // 2), max(0, (size - width) // 2)
        padded = np.empty((max(size, height), max(size, width), 3), dtype=image.dtype)
        padded[...] = np.asarray(fill, dtype=image.dtype)
        padded[top:top + height, left:left + width] = image
        image, (height, width) = padded, padded.shape[:2]
    top, left = crop_offset(height - size, rounding), crop_offset(width - size, rounding)
    return image[top:top + size, left:left + size]


def as_pil(image: np.ndarray | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image), mode="RGB")


class Normalise:
    """uint8 (H, W, 3) -> float32 (3, H, W), scaled to [0, 1] and normalised by the tower's mean and std, as
    torchvision's ToTensor and Normalize do (in one multiply and one subtraction: within 1e-6 of theirs)."""

    def __init__(self, data_config: dict[str, Any]):
        mean = torch.tensor(data_config["mean"], dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(data_config["std"], dtype=torch.float64).view(3, 1, 1)
        self.scale, self.offset = (1 / (255 * std)).float(), (mean / std).float()

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1).to(torch.float32)
        return tensor.mul_(self.scale).sub_(self.offset)


class EvalTransform:
    """An RGB image (uint8 array (H, W, 3) or PIL image) -> the float tensor (3, size, size) its tower expects."""

    random = False

    def __init__(self, data_config: dict[str, Any]):
        self.data_config = data_config
        self.size = image_size(data_config)
        self.normalise = Normalise(data_config)
        self.fill = data_config.get("fill", 0)  # open_clip pads with its fill_color, black by default
        if data_config.get("crop_mode") == "border":  # timm pads with the mean colour
            self.fill = [min(255, max(0, round(255 * value))) for value in data_config["mean"]]

    def __call__(self, image: np.ndarray | Image.Image, seed: int | None = None) -> torch.Tensor:
        image = as_pil(image)
        height, width = resized_shape(image.height, image.width, self.data_config)
        rounding = self.data_config.get("crop_rounding", "half_even")
        if height * width > MAX_RESIZED_PIXELS:
            return self.normalise(crop_or_pad(self.resized_crop(image, height, width, rounding), self.size,
                                              rounding, self.fill))
        return self.normalise(crop_or_pad(resize(image, height, width, self.data_config), self.size, rounding,
                                          self.fill))

    def resized_crop(self, image: Image.Image, height: int, width: int, rounding: str) -> np.ndarray:
        """The part of a resized panorama the center crop keeps, resized from its own region of the image: the
        whole strip resized would take gigabytes (a 1 x 100,000 picture), and a level apart in a few pixels is all
        this costs. A side shorter than the crop is kept whole (and padded after)."""
        y_scale, x_scale = image.height / height, image.width / width
        kept_height, kept_width = min(height, self.size), min(width, self.size)
        top = crop_offset(height - self.size, rounding) if height > self.size else 0
        left = crop_offset(width - self.size, rounding) if width > self.size else 0
        box = (left * x_scale, top * y_scale, (left + kept_width) * x_scale, (top + kept_height) * y_scale)
        return resize(image, kept_height, kept_width, {**self.data_config, "resize_with": "pil"}, box=box)


def random_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                    rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, upper, right, lower) of a random crop covering a `scale` fraction of the area with an aspect ratio in
    `ratio` (log-uniform), as torchvision's RandomResizedCrop draws it; the central crop when ten draws miss."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, left + crop_width, top + crop_height
    aspect = width / height
    if aspect < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return left, top, left + crop_width, top + crop_height


class TrainTransform:
    """A random resized crop in one antialiased resize, then colour jitter (and a flip, if asked): an RGB image ->
    float tensor (3, size, size). Reseeded on every call, from `seed` when the caller has one (the training sampler
    gives each sample its own) or else from torch's RNG, so augmentations repeat with the run's seed."""

    random = True

    def __init__(self, data_config: dict[str, Any], crop_scale: tuple[float, float] = (0.6, 1.0),
                 horizontal_flip: bool = False):
        self.data_config = data_config
        self.size = image_size(data_config)
        self.crop_scale = tuple(crop_scale)
        self.normalise = Normalise(data_config)
        steps: list[Any] = [A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.0, p=0.8)]
        if horizontal_flip:
            steps.append(A.HorizontalFlip(p=0.5))
        self.photometric = A.Compose(steps)

    def __call__(self, image: np.ndarray | Image.Image, seed: int | None = None) -> torch.Tensor:
        seed = seed if seed is not None else int(torch.randint(2**31 - 1, ()))
        image = as_pil(image)
        box = random_crop_box(image.height, image.width, self.crop_scale, (3 / 4, 4 / 3), np.random.default_rng(seed))
        pixels = resize(image, self.size, self.size, self.data_config, box=box)
        self.photometric.set_random_seed(seed)
        return self.normalise(self.photometric(image=np.ascontiguousarray(pixels))["image"])


class OpenCVTransform:
    """liteclip's transforms before antialiasing (albumentations with OpenCV's resize), for models saved then: the
    resize they were trained and evaluated with. Not for new models: shrinking many times over aliases."""

    def __init__(self, pipeline: A.Compose, random: bool = False, shorter_side: int | None = None,
                 panorama: EvalTransform | None = None):
        self.pipeline = pipeline
        self.random = random
        # evaluation that resizes the shorter side to `shorter_side`: a strip whose resized whole would pass
        # MAX_RESIZED_PIXELS goes to `panorama` (PIL, only the center resized) instead of gigabytes of OpenCV
        self.shorter_side, self.panorama = shorter_side, panorama

    def __call__(self, image: np.ndarray | Image.Image, seed: int | None = None) -> torch.Tensor:
        if self.random:
            self.pipeline.set_random_seed(seed if seed is not None else int(torch.randint(2**31 - 1, ())))
        image = np.asarray(image)
        if self.panorama is not None and self.shorter_side is not None:
            shorter, longer = sorted(image.shape[:2])
            if self.shorter_side * self.shorter_side * (longer / shorter) > MAX_RESIZED_PIXELS:
                return self.panorama(image)
        image = self.pipeline(image=image)["image"]  # (H, W, 3) float32, normalised
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def opencv_eval_transform(data_config: dict[str, Any]) -> OpenCVTransform:
    size = image_size(data_config)
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    interpolation = OPENCV_INTERPOLATION.get(data_config.get("interpolation", "bicubic"), cv2.INTER_CUBIC)
    mode = resize_mode(data_config)
    if mode == "squash":
        resize_steps = [A.Resize(height=size, width=size, interpolation=interpolation)]
    elif mode == "longest":
        resize_steps = [A.LongestMaxSize(max_size=size, interpolation=interpolation),
                        A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=0)]
    else:
        resize_steps = [A.SmallestMaxSize(max_size=int(round(size / crop_pct)), interpolation=interpolation),
                        A.CenterCrop(height=size, width=size)]
    return OpenCVTransform(A.Compose([
        *resize_steps, A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0),
    ]), shorter_side=int(round(size / crop_pct)) if mode == "shortest" else None,
        panorama=EvalTransform({**data_config, "resize_with": "pil"}))


def opencv_train_transform(data_config: dict[str, Any], crop_scale: tuple[float, float],
                           horizontal_flip: bool) -> OpenCVTransform:
    size = image_size(data_config)
    interpolation = OPENCV_INTERPOLATION.get(data_config.get("interpolation", "bicubic"), cv2.INTER_CUBIC)
    steps: list[Any] = [
        A.RandomResizedCrop(size=(size, size), scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3),
                            interpolation=interpolation),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.0, p=0.8),
    ]
    if horizontal_flip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps.append(A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0))
    return OpenCVTransform(A.Compose(steps), random=True)


def is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def check_data_config(data_config: dict[str, Any]) -> str:
    """The resizer a data config names, once every key the transforms read is one they can use; else a ConfigError
    naming the key (a saved model's preprocessor_config.json is a file from elsewhere)."""
    def refuse(key: str, expected: str) -> ConfigError:
        value = repr(data_config.get(key))
        value = value if len(value) <= 80 else value[:77] + "..."
        return ConfigError(f"the image preprocessing's {key}={value} (a model's preprocessor_config.json, or its "
                           f"tower's data config): expected {expected}")

    size = data_config.get("input_size")
    if not isinstance(size, (list, tuple)) or len(size) != 3 or not all(is_number(v, 1, 8192) for v in size) \
            or not all(float(v).is_integer() for v in size) or size[0] != 3 or size[1] != size[2]:
        raise refuse("input_size", "(3, side, side): three channels and a square of whole pixels up to 8192")
    for key in ("mean", "std"):
        values = data_config.get(key)
        low = 1e-6 if key == "std" else -1e3
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(is_number(v, low, 1e3)
                                                                                 for v in values):
            raise refuse(key, f"three numbers{' above 0' if key == 'std' else ''}")
    choices = {"resize_with": (None, *RESIZERS), "resize_mode": (None, "shortest", "squash", "longest"),
               "crop_mode": (None, "center", "squash", "border"), "crop_rounding": (None, "half_even", "floor"),
               "interpolation": (None, *PIL_FILTERS, "area", "random")}
    for key, allowed in choices.items():
        if data_config.get(key) not in allowed:
            raise refuse(key, "one of " + ", ".join(str(choice) for choice in allowed if choice is not None))
    if data_config.get("crop_pct") is not None and not is_number(data_config["crop_pct"], 0.05, 2.0):
        raise refuse("crop_pct", "a fraction between 0.05 and 2")
    if data_config.get("resize_size") is not None and not (is_number(data_config["resize_size"], 1, 16384)
                                                           and float(data_config["resize_size"]).is_integer()):
        raise refuse("resize_size", "a whole number of pixels up to 16384")
    fill = data_config.get("fill", 0)
    if not (is_number(fill, 0, 255) or (isinstance(fill, (list, tuple)) and len(fill) == 3
                                        and all(is_number(v, 0, 255) for v in fill))):
        raise refuse("fill", "a grey level 0-255, or three of them")
    return data_config.get("resize_with", "pil")


def eval_transform(data_config: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """The evaluation preprocessing of the tower's library: resize (see the module docstring), center crop,
    normalise."""
    if check_data_config(data_config) == LEGACY_RESIZER:
        return opencv_eval_transform(data_config)
    return EvalTransform(data_config)


def train_transform(data_config: dict[str, Any], crop_scale: tuple[float, float] = (0.6, 1.0),
                    horizontal_flip: bool = False, augment: bool = True) -> Callable[..., torch.Tensor]:
    """Random resized crop and light colour jitter, resized as evaluation resizes."""
    if not augment:
        return eval_transform(data_config)
    if check_data_config(data_config) == LEGACY_RESIZER:
        return opencv_train_transform(data_config, crop_scale, horizontal_flip)
    return TrainTransform(data_config, crop_scale, horizontal_flip)


def build_transforms(data_config: dict[str, Any], augment: bool = True, crop_scale: tuple[float, float] = (0.6, 1.0),
                     horizontal_flip: bool = False) -> tuple[Callable, Callable]:
    """(train transform, eval transform) for a tower's data config."""
    return train_transform(data_config, crop_scale, horizontal_flip, augment), eval_transform(data_config)

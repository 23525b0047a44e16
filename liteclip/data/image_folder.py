"""Folders of image files: listing them (for search indexes), and the ImageFolder class layout
(root/<class name>/*.jpg, as torchvision reads it) as a zero-shot task."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from liteclip.data.captions import LabelledImage, ZeroShotTask
from liteclip.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder`, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image_folder(root: str | Path, templates: Sequence[str] | None = None) -> ZeroShotTask:
    """root/<class name>/*.jpg as a zero-shot task; class names are the folder names with "_" read as a space."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    items = [LabelledImage(path, index) for index, name in enumerate(classes) for path in list_images(root / name)]
    if len(classes) < 2 or not items:
        raise DataError(f"{root} needs at least two class folders with images (root/<class name>/*.jpg)")
    return ZeroShotTask([name.replace("_", " ") for name in classes], items, tuple(templates) if templates else None)

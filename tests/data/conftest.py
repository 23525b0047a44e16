"""Small Flickr8K-shaped datasets written into tmp_path, with real image files drawn by PIL."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import draw_image

CAPTIONS_PER_IMAGE = 5


def image_names(count: int) -> list[str]:
    return [f"{1000 + i}_photo.jpg" for i in range(count)]


def caption_for(name: str, j: int) -> str:
    return f"caption {j} of {name}, with a comma"


def write_kaggle(root: Path, count: int = 20) -> Path:
    for i, name in enumerate(image_names(count)):
        draw_image(root / "Images" / name, (10 * i % 255, 100, 200))
    with open(root / "captions.txt", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for name in image_names(count):
            for j in range(CAPTIONS_PER_IMAGE):
                writer.writerow([name, caption_for(name, j)])
    return root


def write_original(root: Path, count: int = 20, with_splits: bool = True) -> Path:
    names = image_names(count)
    for i, name in enumerate(names):
        draw_image(root / "Flicker8k_Dataset" / name, (200, 10 * i % 255, 50))
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    lines = [f"{name}#{j}\t{caption_for(name, j)}" for name in names for j in range(CAPTIONS_PER_IMAGE)]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    if with_splits:
        (text / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:14]) + "\n")
        (text / "Flickr_8k.devImages.txt").write_text("\n".join(names[14:17]) + "\n")
        (text / "Flickr_8k.testImages.txt").write_text("\n".join(names[17:]) + "\n")
    return root


@pytest.fixture
def kaggle_root(tmp_path: Path) -> Path:
    return write_kaggle(tmp_path / "flickr_kaggle")


@pytest.fixture
def original_root(tmp_path: Path) -> Path:
    return write_original(tmp_path / "flickr_original")

"""Shared fixtures: tiny random-init towers and a locally trained tokenizer, so no test touches the network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liteclip.config import Config, config_from_dict
from liteclip.data.demo import write_text_tower

SENTENCES = [
    "a small red circle on the left", "a large blue square in the middle", "a yellow triangle at the top",
    "two shapes: a green circle above a red square", "a photo of a dog", "a photo of a cat",
    "the photo of a human baby", "a boy jumping with skateboard", "a purple star on a white background",
    "an orange square below a blue triangle", "a picture of a small green triangle on the right",
]


def write_tiny_text_model(directory: Path) -> Path:
    """A 2-layer, 64-wide random BERT and a WordPiece tokenizer trained on a few sentences, saved like a hub model;
    512 positions, as bert-mini has, so it stands in for it under every shipped config."""
    from transformers import AutoConfig, BertModel

    write_text_tower(directory, SENTENCES, hidden_size=64, num_layers=2, vocab_size=200, max_positions=512)
    BertModel(AutoConfig.from_pretrained(directory)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


def tiny_config_dict(text_dir: Path, **sections) -> dict:
    """Nested config data for a model small enough to train in a test: timm test_convnext3 at 32 px + 2-layer BERT."""
    raw = {
        "model": {
            "image": {"name": "test_convnext3", "pretrained": False, "image_size": 32},
            "text": {"name": str(text_dir), "pretrained": True, "max_length": 16},
            "projection": {"dim": 32, "dropout": 0.0},
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture
def tiny_config(tiny_text_dir: Path) -> Config:
    return config_from_dict(tiny_config_dict(tiny_text_dir))


@pytest.fixture
def model_dir(tiny_config: Config, tmp_path: Path) -> Path:
    """A tiny random-init model saved with save_pretrained, as train.py would export it."""
    import torch

    from liteclip import build_model

    torch.manual_seed(0)
    build_model(tiny_config.model).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def draw_image(path: Path, color: tuple[int, int, int], size: int = 40) -> Path:
    """A real image file: a coloured square on grey with a little noise."""
    rng = np.random.default_rng(sum(color))
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = color
    pixels = np.clip(pixels + rng.integers(-5, 6, pixels.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def upright_picture():
    """48 wide, 32 high, with a red block on the left: which way is up is visible in the pixels."""
    pixels = np.full((32, 48, 3), 230, dtype=np.uint8)
    pixels[8:24, 2:18] = (200, 20, 20)
    return pixels


def save_as_phone_photo(pixels, path):
    """What a phone camera writes for a photo taken in portrait: the sensor's pixels, turned a quarter anticlockwise,
    and EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    return path

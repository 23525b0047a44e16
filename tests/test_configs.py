"""Every YAML in configs/ loads strictly and builds, as timm tests every model (weights swapped for tiny ones)."""

from pathlib import Path

import pytest
import timm

from liteclip import build_model
from liteclip.config import load_config
from tests.weights.test_huggingface import write_tiny_hf_clip, write_tiny_siglip
from tests.weights.test_openclip import write_tiny_open_clip

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {"demo.yaml", "liteclip.yaml", "flickr8k.yaml", "simple_clip.yaml", "openai_clip_finetune.yaml",
            "finetune_open_clip.yaml", "finetune_siglip.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_opens_with_its_command(path):
    config = load_config(path)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and f"configs/{path.name}" in first_line
    name = config.model.image.name
    assert timm.is_model(name.split(".")[0]), name
    if config.model.image.pretrained and "." in name:
        assert name in timm.list_pretrained(name), f"{name}: timm has no such pretrained tag"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_with_tiny_towers(path, tiny_text_dir, tmp_path):
    init_from = load_config(path).model.init_from  # a checkpoint: a tiny one of its kind written here instead
    if init_from and init_from.startswith("open_clip:"):
        weights = write_tiny_open_clip(tmp_path, "liteclip-test-vit")
        overrides = [f"model.init_from=open_clip:liteclip-test-vit@{weights}"]
    elif init_from and "siglip" in init_from:
        overrides = [f"model.init_from={write_tiny_siglip(tmp_path)}"]
    elif init_from:
        overrides = [f"model.init_from={write_tiny_hf_clip(tmp_path / 'hf_clip')}"]
    else:
        overrides = ["model.image.pretrained=false", "model.image.image_size=32", f"model.text.name={tiny_text_dir}"]
    config = load_config(path, overrides)
    model = build_model(config.model)
    if model.config.projection.kind != "identity":  # checkpoints whose towers project themselves have no head
        assert model.image_projection.projection.out_features == model.config.projection.dim
    assert model.image_encoder.config.locked == config.model.image.locked


def test_liteclip_recipe_is_exact():
    config = load_config(CONFIGS[0].parent / "liteclip.yaml")
    assert config.model.image.name == "convnext_tiny.fb_in1k" and config.model.image.pretrained
    assert config.model.text.name == "google/bert_uncased_L-4_H-256_A-4" and config.model.text.pooling == "mean"
    assert (config.model.projection.dim, config.model.projection.dropout, config.model.text.max_length) == (256, 0.1, 128)
    assert (config.data.batch_size, config.optim.name, config.optim.lr, config.train.epochs) == (64, "adam", 2e-4, 5)

"""The saved model directory: a model card whose front matter the Hugging Face Hub can read."""

import pytest
import torch
import yaml

from liteclip import build_model
from liteclip.config import Config
from liteclip.pretrained import CARD_NAME


def front_matter(path):
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_save_pretrained_writes_a_model_card_with_front_matter_and_metrics(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config.model)
    full = Config(model=tiny_config.model)
    model.save_pretrained(tmp_path / "m", full_config=full, metrics={"test_mean_recall": 42.5, "zero_shot_top1": 90.0})
    meta, text = front_matter(tmp_path / "m" / CARD_NAME)
    assert meta["library_name"] == "liteclip" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert "clip" in meta["tags"] and meta["license"] == "other"
    assert meta["metrics"] == ["test_mean_recall", "zero_shot_top1"]
    assert "| test_mean_recall | 42.5 |" in text and "test_convnext3" in text and "ZeroShotPipeline" in text


def test_a_readme_the_user_wrote_is_kept(tiny_config, tmp_path):
    model = build_model(tiny_config.model)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / CARD_NAME).write_text("# my own notes")
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / CARD_NAME).read_text() == "# my own notes"
    model.save_pretrained(tmp_path / "fresh")
    model.save_pretrained(tmp_path / "fresh", metrics={"test_loss": 1.5})  # liteclip's own card is rewritten
    assert "| test_loss | 1.5 |" in (tmp_path / "fresh" / CARD_NAME).read_text()


@pytest.mark.parametrize("dataset, expected", [("flickr8k", ["flickr8k"]), ("demo", None)])
def test_the_card_names_real_datasets(tiny_config, tmp_path, dataset, expected):
    from liteclip.config import DataConfig

    model = build_model(tiny_config.model)
    model.save_pretrained(tmp_path / "m", full_config=Config(model=tiny_config.model, data=DataConfig(dataset=dataset)))
    assert front_matter(tmp_path / "m" / CARD_NAME)[0].get("datasets") == expected

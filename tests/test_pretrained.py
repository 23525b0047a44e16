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


def test_the_default_model_directory_of_a_fresh_clone_gets_the_model_card(tiny_config, tmp_path):
    """A fresh clone's ./model must not hold a README of its own: one would be kept in place of the card."""
    import shutil
    import subprocess
    from pathlib import Path

    from liteclip.pretrained import CARD_MARKER

    repo = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "model"], cwd=repo, capture_output=True, text=True, check=True)
    clone_model_dir = tmp_path / "model"
    clone_model_dir.mkdir()
    for name in tracked.stdout.split():  # what a clone's ./model holds before the first training
        shutil.copy(repo / name, clone_model_dir / Path(name).name)
    build_model(tiny_config.model).save_pretrained(clone_model_dir, metrics={"test_mean_recall": 42.5})
    assert CARD_MARKER in (clone_model_dir / CARD_NAME).read_text()


@pytest.mark.parametrize("dataset, expected", [("flickr8k", ["flickr8k"]), ("demo", None)])
def test_the_card_names_real_datasets(tiny_config, tmp_path, dataset, expected):
    from liteclip.config import DataConfig

    model = build_model(tiny_config.model)
    model.save_pretrained(tmp_path / "m", full_config=Config(model=tiny_config.model, data=DataConfig(dataset=dataset)))
    assert front_matter(tmp_path / "m" / CARD_NAME)[0].get("datasets") == expected


# ------------------------------------------------------------------------- folders users did not make (issue 26)


def plant_remote_code(model_dir, marker):
    """The three edits of a model folder that carries code: its config asks for remote code, its text tower's
    config maps AutoModel to a module beside it, and that module leaves `marker` behind when it is imported."""
    import json
    import shutil

    planted = model_dir.parent / "planted"
    shutil.copytree(model_dir, planted)
    config = yaml.safe_load((planted / "config.yaml").read_text())
    config["model"]["text"]["trust_remote_code"] = True
    (planted / "config.yaml").write_text(yaml.safe_dump(config))
    text_config = json.loads((planted / "text_config" / "config.json").read_text())
    text_config["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (planted / "text_config" / "config.json").write_text(json.dumps(text_config))
    (planted / "text_config" / "evil.py").write_text(
        f"from pathlib import Path\nfrom transformers import BertModel\n\nPath({str(marker)!r}).write_text('ran')\n\n\n"
        f"class EvilModel(BertModel):\n    pass\n")
    return planted


def test_a_model_folder_never_runs_its_own_code_unless_the_caller_allows_it(model_dir, tmp_path, capsys):
    from liteclip import CLIP, ZeroShotPipeline
    from liteclip.cli import main
    from liteclip.train.distill import teacher_embeddings
    from liteclip.errors import ModelLoadError
    from liteclip.precision import resolve_precision
    from tests.conftest import draw_image

    marker = tmp_path / "the_folder_ran_code"
    planted = plant_remote_code(model_dir, marker)
    with pytest.raises(ModelLoadError, match=r"text_config/config.json: AutoModel -> evil.EvilModel.*"
                                             r"trust_remote_code=True"):
        CLIP.from_pretrained(planted)
    with pytest.raises(ModelLoadError, match="carries"):
        ZeroShotPipeline(planted, device="cpu")
    with pytest.raises(ModelLoadError, match="distill.trust_remote_code"):
        cpu = torch.device("cpu")
        teacher_embeddings(str(planted), [], tmp_path, cpu, resolve_precision("fp32", cpu))
    image = draw_image(tmp_path / "x.png", (200, 0, 0))
    assert main(["predict", str(image), "--model-dir", str(planted), "--labels", "a", "b", "--device", "cpu"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not marker.exists()
    # the caller's word, and only it, lets the code run: what transformers then does with the folder is its own
    model = CLIP.from_pretrained(planted, trust_remote_code=True)
    assert marker.read_text() == "ran" and type(model.text_encoder.model).__name__ == "EvilModel"


def test_a_model_folder_whose_config_is_not_yaml_is_one_clear_error(model_dir):
    from liteclip import CLIP
    from liteclip.errors import ModelLoadError

    (model_dir / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ModelLoadError, match=r"config.yaml: not valid YAML"):
        CLIP.from_pretrained(model_dir)
    (model_dir / "config.yaml").write_text("just a sentence\n")
    with pytest.raises(ModelLoadError, match=r"config.yaml: the top level must be a mapping"):
        CLIP.from_pretrained(model_dir)


def test_a_text_tower_folder_without_a_tokenizer_is_a_config_error(tiny_config, tiny_text_dir, tmp_path):
    import dataclasses
    import shutil

    from liteclip import CLIP
    from liteclip.config import ConfigError

    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_text_dir / name, bare / name)
    config = dataclasses.replace(tiny_config.model, text=dataclasses.replace(tiny_config.model.text, name=str(bare)))
    with pytest.raises(ConfigError, match=r"no_tokenizer: the folder holds a text tower but no tokenizer"):
        CLIP.from_config(config)

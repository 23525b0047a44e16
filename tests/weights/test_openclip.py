"""open_clip checkpoints as liteclip models (`open_clip:ARCH@TAG_OR_FILE`), checked against open_clip itself on tiny
random models registered here: a ViT and a timm image tower, each with open_clip's own text transformer."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from liteclip import CLIP, ZeroShotPipeline
from liteclip.config import load_config
from liteclip.errors import ConfigError
from liteclip.weights.lora import merged_copy
from liteclip.train.loop import fit

TEXT = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
ARCHITECTURES = {
    "liteclip-test-vit": {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 48,
                                                          "patch_size": 8, "head_width": 24}, "text_cfg": TEXT},
    "liteclip-test-timm": {"embed_dim": 24, "vision_cfg": {"timm_model_name": "test_convnext3",
                                                           "timm_model_pretrained": False, "timm_pool": "avg",
                                                           "timm_proj": "linear", "image_size": 32},
                           "text_cfg": TEXT},
}


def write_tiny_open_clip(root, name: str, seed: int = 0) -> str:
    """The architecture registered with open_clip, randomly initialised and saved as open_clip saves weights."""
    import open_clip

    (root / f"{name}.json").write_text(json.dumps(ARCHITECTURES[name]))
    open_clip.add_model_config(root / f"{name}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    with torch.no_grad():  # a temperature other than the default, so taking it over is checked
        model.logit_scale.fill_(3.0 + seed)
    path = str(root / f"{name}_open_clip_model.safetensors")
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("open_clip")
    return {name: write_tiny_open_clip(root, name, seed) for seed, name in enumerate(ARCHITECTURES)}


def reference(name: str, weights: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def photos(tmp_path, count: int = 3) -> list:
    """32 x 32 images: already the towers' input size, so both preprocessings resize nothing."""
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        path = tmp_path / f"photo_{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_embeddings_and_probabilities_equal_open_clips_own(name, checkpoints, tmp_path):
    theirs, preprocess, tokenizer = reference(name, checkpoints[name])
    pipeline = ZeroShotPipeline(f"open_clip:{name}@{checkpoints[name]}", device="cpu")
    labels = ["a boy jumping with skateboard", "a photo of a cat", "two dogs playing in the snow"]
    paths = photos(tmp_path)
    pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in paths])
    torch.testing.assert_close(torch.stack([pipeline.preprocess(path) for path in paths]), pixels, atol=1e-5, rtol=0)
    with torch.no_grad():
        image_embeds = theirs.encode_image(pixels, normalize=True)
        text_embeds = theirs.encode_text(tokenizer(labels), normalize=True)
        probabilities = (theirs.logit_scale.exp() * image_embeds @ text_embeds.T).softmax(dim=-1)
    torch.testing.assert_close(pipeline.encode_images(paths), image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(pipeline.encode_labels(labels), text_embeds, atol=1e-5, rtol=0)
    for row, predictions in zip(probabilities, pipeline.predict(paths, labels)):
        ours = dict(predictions)
        assert [ours[label] for label in labels] == pytest.approx(row.tolist(), abs=1e-4)


def test_save_pretrained_then_from_pretrained_is_bit_identical(checkpoints, tmp_path):
    model = CLIP.from_pretrained(f"open_clip:liteclip-test-vit@{checkpoints['liteclip-test-vit']}")
    model.save_pretrained(tmp_path / "saved")
    loaded = CLIP.from_pretrained(tmp_path / "saved")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())
    tokens = loaded.tokenizer(["a dog on a beach"], return_tensors="pt")
    assert torch.equal(tokens["input_ids"], model.tokenizer(["a dog on a beach"], return_tensors="pt")["input_ids"])
    assert loaded.data_config == model.data_config


def captions_dataset(tmp_path) -> dict[str, str]:
    """24 drawn photos with two captions each, as a captions CSV."""
    rows, rng = [], np.random.default_rng(3)
    words = [f"{colour} {shape}" for colour in ("red", "green", "blue", "yellow", "purple", "orange")
             for shape in ("square", "circle", "star", "block")]
    for i, word in enumerate(words):
        pixels = np.full((40, 40, 3), 128, dtype=np.uint8)
        pixels[10:30, 10:30] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        rows += [(f"{i}.png", f"a {word}"), (f"{i}.png", f"{word} on grey")]
    with open(tmp_path / "captions.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "caption"), *rows])
    return {"data.dataset": "csv", "data.root": str(tmp_path), "data.captions_file": "captions.csv"}


# a locked random ViT sees every drawn photo alike (cosine 0.99): the locked runs take the timm tower (0.84)
@pytest.mark.parametrize("name, tune", [
    ("liteclip-test-vit", ["model.image.tune=full"]),
    ("liteclip-test-timm", ["model.image.tune=locked", "train.cache_image_features=true"]),  # LiT, cached
    ("liteclip-test-timm", ["model.image.tune=locked", "model.text.tune=lora",
                            "model.text.lora.targets=[mlp.c_fc, mlp.c_proj]"]),
])
def test_a_fine_tune_starts_from_the_checkpoint_and_its_loss_falls(name, tune, checkpoints, tmp_path):
    data = captions_dataset(tmp_path)
    spec = f"open_clip:{name}@{checkpoints[name]}"
    config = load_config("configs/demo.yaml", [
        f"model.init_from={spec}", *[f"{key}={value}" for key, value in data.items()], "data.batch_size=6",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "data.num_workers=0", "optim.lr=2e-3",
        "optim.warmup_steps=0", "train.epochs=10", "train.log_every=1", "train.zero_shot_eval=false",
        f"train.output_dir={tmp_path / 'run'}", f"train.model_dir={tmp_path / 'model'}", *tune])
    start = merged_copy(CLIP.from_config(config.model))  # LoRA folded in, as a saved model holds it
    fit(config, show_progress=False)
    with open(tmp_path / "run" / "metrics.csv") as handle:
        losses = [float(row["loss"]) for row in csv.DictReader(handle)]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    trained = CLIP.from_pretrained(tmp_path / "model")
    assert trained.config.init_from == spec and trained.config.text.source == "open_clip"
    moved = [key for key, value in start.state_dict().items() if not torch.equal(trained.state_dict()[key], value)]
    assert moved and all(not key.startswith("image_encoder") for key in moved) == ("locked" in tune[0])


def test_a_saved_open_clip_model_is_a_distillation_teacher_with_open_clips_own_embeddings(checkpoints, tmp_path):
    from liteclip.data.captions import CaptionedImage
    from liteclip.train.distill import teacher_embeddings
    from liteclip.precision import Precision

    name = "liteclip-test-timm"
    CLIP.from_pretrained(f"open_clip:{name}@{checkpoints[name]}").save_pretrained(tmp_path / "teacher")
    paths = photos(tmp_path)
    images = [CaptionedImage(path, [f"photo number {i}", f"a picture {i}"]) for i, path in enumerate(paths)]
    teacher = teacher_embeddings(str(tmp_path / "teacher"), images, tmp_path / "cache", torch.device("cpu"),
                                 Precision(None, "cpu"))
    theirs, preprocess, tokenizer = reference(name, checkpoints[name])
    with torch.no_grad():
        image_embeds = theirs.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths]),
                                           normalize=True)
        text_embeds = theirs.encode_text(tokenizer([c for image in images for c in image.captions]), normalize=True)
    torch.testing.assert_close(teacher.image_embeds, image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(teacher.text_embeds, text_embeds, atol=1e-5, rtol=0)
    assert teacher.scale == pytest.approx(theirs.logit_scale.exp().item())


def test_unknown_names_unfetchable_tags_and_weights_of_another_architecture_are_one_clear_error(checkpoints):
    with pytest.raises(ConfigError, match="no architecture 'liteclip-test-vjt'.*liteclip-test-vit"):
        CLIP.from_pretrained("open_clip:liteclip-test-vjt@x")
    with pytest.raises(ConfigError, match="neither a pretrained tag of liteclip-test-vit"):
        CLIP.from_pretrained("open_clip:liteclip-test-vit@laion2b_s34b_b79k")
    with pytest.raises(ConfigError, match="could not be fetched"):  # a real tag, and no network here
        CLIP.from_pretrained("open_clip:RN50@openai")
    with pytest.raises(ConfigError, match="do not fit the open_clip architecture liteclip-test-timm"):
        CLIP.from_pretrained(f"open_clip:liteclip-test-timm@{checkpoints['liteclip-test-vit']}")


# ----------------------------------------------------------------------------- messy specs and folders (issue 38)


def test_a_spec_without_weights_is_refused_instead_of_predicting_with_random_ones(checkpoints, capsys, tmp_path):
    from liteclip.cli import main

    with pytest.raises(ConfigError, match="names no weights, so the model would be random"):
        ZeroShotPipeline("open_clip:liteclip-test-vit", device="cpu")
    with pytest.raises(ConfigError, match="no architecture 'liteclip-test-vjt'"):
        ZeroShotPipeline("open_clip:liteclip-test-vjt", device="cpu")
    image = photos(tmp_path, 1)[0]
    assert main(["predict", str(image), "--model-dir", "open_clip:liteclip-test-vit", "--labels", "a", "b"]) == 2
    assert "names no weights" in capsys.readouterr().err


def test_weights_that_are_text_or_a_code_running_pickle_are_one_clear_error_and_run_nothing(checkpoints, tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    code = tmp_path / "weights.pt"
    code.write_bytes(pickle.dumps({"state_dict": Payload()}))
    for weights in (text, code):
        with pytest.raises(ConfigError, match="not a checkpoint that loads without running code"):
            CLIP.from_pretrained(f"open_clip:liteclip-test-vit@{weights}")
    assert not (tmp_path / "ran").exists()


def test_a_saved_open_clip_model_whose_text_tower_folder_carries_code_is_refused_like_any_folder(checkpoints,
                                                                                                tmp_path, capsys):
    """Issue 38: open_clip_config.json naming a Hugging Face text tower with an auto_map passed liteclip's check,
    and transformers then asked y/N (or raised, with stdin closed)."""
    from liteclip.cli import main
    from liteclip.errors import ModelLoadError

    saved = tmp_path / "saved"
    CLIP.from_pretrained(f"open_clip:liteclip-test-vit@{checkpoints['liteclip-test-vit']}").save_pretrained(saved)
    tower = tmp_path / "tower_with_code"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {
        "AutoModel": "modeling_evil.EvilModel"}}))
    config = json.loads((saved / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = str(tower)
    (saved / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="modeling_evil.EvilModel"):
        CLIP.from_pretrained(saved)
    image = photos(tmp_path, 1)[0]
    assert main(["predict", str(image), "--model-dir", str(saved), "--labels", "a", "b"]) == 2
    assert "asks to run Python code" in capsys.readouterr().err


HUB_ROUND_TRIP = """
import sys, torch
from liteclip import CLIP, ZeroShotPipeline
spec, out = sys.argv[1], sys.argv[2]
pipeline = ZeroShotPipeline(spec, device="cpu")
labels = ["a photo of a cat", "two dogs playing in the snow"]
before = pipeline.encode_labels(labels)
pipeline.model.save_pretrained(out)
again = ZeroShotPipeline(out, device="cpu")
assert torch.equal(again.encode_labels(labels), before)
print("ROUND TRIP", again.model.config.image.name)
"""


def test_an_open_clip_hf_hub_model_loads_from_the_hub_cache_and_saves_and_loads_again(checkpoints, tmp_path):
    """`open_clip:hf-hub:ORG/NAME`, from the Hugging Face cache (offline), as open_clip's own hub models are laid
    out (open_clip_config.json and open_clip_model.safetensors), is saved as a liteclip model and loads back."""
    import os
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--liteclip-test--tiny-vit" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(checkpoints["liteclip-test-vit"], snapshot / "open_clip_model.safetensors")
    (snapshot / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": ARCHITECTURES["liteclip-test-vit"],
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    environment = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", HUB_ROUND_TRIP, "open_clip:hf-hub:liteclip-test/tiny-vit",
                             str(tmp_path / "saved")], capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ROUND TRIP hf-hub:liteclip-test/tiny-vit" in result.stdout
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert saved["resize_mode"] == "squash" and saved["mean"] == [0.5, 0.5, 0.5]

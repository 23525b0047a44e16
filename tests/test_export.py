"""Exports run outside liteclip: the ONNX files in onnxruntime, the image tower in plain timm, the zero-shot head as
an ordinary classifier; each compared with the PyTorch model it came from."""

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from PIL import Image

from liteclip import CLIP, build_model
from liteclip.cli import main
from liteclip.export import ONNX_OPSET, ZeroShotClassifier, export_onnx, export_timm, zero_shot_head
from liteclip.pipeline import ZeroShotPipeline
from tests.conftest import draw_image
from tests.weights.test_huggingface import write_tiny_hf_clip
from tests.train.test_loop import train_tiny_model
from tests.user_files import assert_user_files_untouched, plant_user_files, snapshot

CAPTIONS = ["a red circle", "two shapes: a blue square above a yellow triangle", "a star", "a small green square"]


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("demo_trained"), "train.max_steps=3")


def onnx_matches_pytorch(model, out_dir, image_side):
    image_session = onnxruntime.InferenceSession(str(out_dir / "image_encoder.onnx"))
    text_session = onnxruntime.InferenceSession(str(out_dir / "text_encoder.onnx"))
    for batch in (1, 3):  # batch sizes other than the traced one: the batch axis is dynamic
        pixels = torch.randn(batch, 3, image_side, image_side)
        with torch.no_grad():
            expected = model.encode_image(pixels).numpy()
        got = image_session.run(None, {"pixel_values": pixels.numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    for captions in (CAPTIONS, CAPTIONS[:1]):  # other lengths and paddings than the traced ones
        tokens = model.tokenizer(captions, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()
        got = text_session.run(None, {"input_ids": tokens["input_ids"].numpy(),
                                      "attention_mask": tokens["attention_mask"].numpy()})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_onnx_export_of_a_demo_trained_model_matches_pytorch(demo_model_dir, tmp_path):
    out = export_onnx(CLIP.from_pretrained(demo_model_dir), tmp_path / "onnx")
    model = CLIP.from_pretrained(demo_model_dir)
    onnx_matches_pytorch(model, out, 32)
    info = json.loads((out / "export.json").read_text())
    opsets = {entry.domain: entry.version for entry in onnx.load(str(out / "image_encoder.onnx")).opset_import}
    print(f"ONNX opset used: {opsets.get('', opsets)}")
    assert info["opset"] == ONNX_OPSET == opsets.get("", opsets.get("ai.onnx"))
    assert info["logit_scale"] == pytest.approx(float(model.scale()))
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((out / "preprocessor_config.json").read_text())["input_size"] == [3, 32, 32]


def test_onnx_export_of_a_hugging_face_clip_matches_pytorch(tmp_path):
    model = CLIP.from_pretrained(write_tiny_hf_clip(tmp_path / "hf_clip"))
    onnx_matches_pytorch(model, export_onnx(model, tmp_path / "onnx"), 30)


def test_a_tower_built_with_timm_keyword_arguments_exports_them_for_timm_to_rebuild(tiny_config, tmp_path):
    image = dataclasses.replace(tiny_config.model.image, model_kwargs={"dims": [8, 16, 24, 40]})
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(tiny_config.model, image=image)).eval()
    out = export_timm(model, tmp_path / "timm")
    assert json.loads((out / "config.json").read_text())["model_args"] == {"dims": [8, 16, 24, 40]}
    tower = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()  # no kwargs given here
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), model.image_encoder(pixels))


def test_the_image_tower_loads_in_plain_timm_and_the_zero_shot_head_classifies_as_the_pipeline(demo_model_dir,
                                                                                               tmp_path):
    model = CLIP.from_pretrained(demo_model_dir)
    out = export_timm(model, tmp_path / "timm")
    config = json.loads((out / "config.json").read_text())
    tower = timm.create_model(config["architecture"], pretrained=True,
                              pretrained_cfg_overlay={"file": str(out / "model.safetensors")}, num_classes=0).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), model.image_encoder(pixels))

    labels = ["a red circle", "a blue square", "a green star", "a yellow triangle"]
    classifier = ZeroShotClassifier(model, zero_shot_head(model, labels)).eval()
    pipeline = ZeroShotPipeline(demo_model_dir, device="cpu")  # the classifier's device: the same arithmetic
    images = [draw_image(tmp_path / f"{i}.png", color, size=32)
              for i, color in enumerate([(220, 40, 40), (40, 80, 220), (40, 170, 60), (235, 215, 40)])]
    with torch.no_grad():
        pixels = torch.stack([pipeline.transform(np.asarray(Image.open(p).convert("RGB"))) for p in images])
        logits = classifier(pixels)
    for row, image in zip(logits, images):
        probs = dict(pipeline.predict(image, labels))
        assert labels[int(row.argmax())] == max(probs, key=probs.get)
        np.testing.assert_allclose(row.softmax(-1).numpy(), [probs[l] for l in labels], atol=1e-5)


def test_export_command(demo_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0 and "usage: liteclip export" in capsys.readouterr().out
    assert main(["export", str(demo_model_dir), "--format", "timm", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model.safetensors").is_file()
    assert main(["export", str(demo_model_dir), "--format", "onnx", "--out", str(tmp_path / "o")]) == 0
    assert "image_encoder.onnx, preprocessor_config.json, text_encoder.onnx" in capsys.readouterr().out


# ------------------------------------------------------------------------- an export never eats its model (issue 26)


@pytest.mark.parametrize("out", [".", "inner", ".."])
@pytest.mark.parametrize("export_format", ["timm", "onnx"])
def test_an_export_into_or_around_its_own_model_is_refused_and_the_model_is_untouched(model_dir, capsys, out,
                                                                                    export_format):
    from liteclip.files import sha256_of
    from liteclip.errors import InputError

    weights = sha256_of(model_dir / "model.safetensors")
    target = (model_dir / out) if out != "." else model_dir
    assert main(["export", str(model_dir), "--format", export_format, "--out", str(target)]) == 2
    assert "would overwrite its own input" in capsys.readouterr().err
    exporter = export_timm if export_format == "timm" else export_onnx
    with pytest.raises(InputError, match="would overwrite its own input"):  # the library refuses too
        exporter(CLIP.from_pretrained(model_dir), target)
    assert sha256_of(model_dir / "model.safetensors") == weights
    assert ZeroShotPipeline(model_dir, device="cpu").predict(draw_image(model_dir.parent / "x.png", (9, 9, 9)),
                                                             ["a", "b"])


def test_an_opset_outside_the_supported_range_is_one_line(model_dir, tmp_path, capsys):
    assert main(["export", str(model_dir), "--format", "onnx", "--opset", "5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "opset 5 is outside what this export supports (14 to 20" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------- an export never touches the user's files (issue 38)


@pytest.mark.parametrize("export_format", ["timm", "onnx"])
def test_an_export_through_dot_dot_into_a_folder_of_the_users_files_keeps_every_one_of_them(model_dir, tmp_path,
                                                                                           export_format):
    victim = tmp_path / "victim"
    (victim / "inner").mkdir(parents=True)
    before = plant_user_files(victim)
    assert main(["export", str(model_dir), "--format", export_format, "--out", str(victim / "inner" / "..")]) == 0
    assert_user_files_untouched(victim, before)
    assert (victim / ("model.safetensors" if export_format == "timm" else "image_encoder.onnx")).is_file()


def test_an_export_into_a_folder_holding_the_users_config_json_is_refused_and_the_folder_is_as_it_was(model_dir,
                                                                                                     tmp_path, capsys):
    out = tmp_path / "mine"
    before = plant_user_files(out, names=("config.json",))
    assert main(["export", str(model_dir), "--format", "timm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds config.json, which liteclip did not write" in err and "Traceback" not in err
    assert_user_files_untouched(out, before, exactly=True)


def test_an_export_that_fails_midway_leaves_the_folder_as_it_was(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    plant_user_files(out)
    export_timm(CLIP.from_pretrained(model_dir), out)  # an earlier export, replaced by the next one
    before = snapshot(out)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_timm(CLIP.from_pretrained(model_dir), out)
    assert_user_files_untouched(out, before, exactly=True)


def test_a_saved_model_folder_is_refused_over_the_users_files_and_replaced_over_its_own(model_dir, tmp_path):
    from liteclip.errors import InputError

    model = CLIP.from_pretrained(model_dir)
    out = tmp_path / "shared"
    before = plant_user_files(out, names=("config.yaml",))
    with pytest.raises(InputError, match="already holds config.yaml"):
        model.save_pretrained(out)
    assert_user_files_untouched(out, before, exactly=True)
    (out / "config.yaml").unlink()
    before = snapshot(out)
    model.save_pretrained(out)
    model.save_pretrained(out)  # its own earlier save: replaced
    assert_user_files_untouched(out, before)
    assert ZeroShotPipeline(out, device="cpu").predict(draw_image(tmp_path / "x.png", (9, 90, 9)), ["a", "b"])


def test_a_siglip_onnx_export_records_its_bias_and_that_its_probabilities_are_sigmoids(tmp_path):
    from tests.weights.test_huggingface import siglip_inputs, write_tiny_siglip

    siglip = write_tiny_siglip(tmp_path / "siglip")
    out = export_onnx(CLIP.from_pretrained(siglip), tmp_path / "onnx")
    info = json.loads((out / "export.json").read_text())
    assert info["probabilities"] == "sigmoid" and info["logit_bias"] == pytest.approx(-2.5)
    images, labels = siglip_inputs()
    pipeline = ZeroShotPipeline(str(siglip), device="cpu")
    pixels = torch.stack([pipeline.preprocess(image) for image in images]).numpy()
    image_embeds = onnxruntime.InferenceSession(str(out / "image_encoder.onnx")).run(None, {"pixel_values": pixels})[0]
    tokens = pipeline.model.tokenizer(labels, return_tensors="np")
    assert info["text_inputs"]["names"] == ["input_ids"]  # SigLIP's text tower reads no mask: the graph takes none
    text_embeds = onnxruntime.InferenceSession(str(out / "text_encoder.onnx")).run(
        None, {"input_ids": tokens["input_ids"].astype(np.int64)})[0]
    logits = info["logit_scale"] * image_embeds @ text_embeds.T + info["logit_bias"]  # what an ONNX user computes
    for row, predictions in zip(1 / (1 + np.exp(-logits)), pipeline.predict(images, labels)):
        assert [dict(predictions)[label] for label in labels] == pytest.approx(row.tolist(), abs=1e-4)


def test_an_export_into_the_current_folder_writes_there_beside_the_users_files(model_dir, tmp_path, monkeypatch):
    here = tmp_path / "here"
    before = plant_user_files(here)
    monkeypatch.chdir(here)
    assert main(["export", str(model_dir), "--format", "timm", "--out", "."]) == 0
    assert_user_files_untouched(here, before)
    assert (here / "model.safetensors").is_file() and (here / "config.json").is_file()


def test_a_folder_of_the_users_own_model_files_is_refused_whatever_names_they_have(model_dir, tmp_path):
    """Second review of issue 38: any folder holding config.yaml and model.safetensors passed for an older
    liteclip's, and save_pretrained replaced the user's own files; an export.json saying "onnx" did the same."""
    from liteclip.errors import InputError

    mine = tmp_path / "mine"
    before = plant_user_files(mine, names=("config.yaml", "model.safetensors", "preprocessor_config.json"))
    (mine / "tokenizer").symlink_to(tmp_path)
    before = snapshot(mine)
    with pytest.raises(InputError, match="already holds"):
        CLIP.from_pretrained(model_dir).save_pretrained(mine)
    assert_user_files_untouched(mine, before, exactly=True)
    onnx = tmp_path / "onnx"
    before = plant_user_files(onnx, names=("image_encoder.onnx", "preprocessor_config.json"))
    (onnx / "export.json").write_text('{"format": "onnx"}')
    before = snapshot(onnx)
    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(onnx)]) == 2
    assert_user_files_untouched(onnx, before, exactly=True)


@pytest.mark.parametrize("manifest", ["stale", "forged names", "forged hashes", "edited"])
def test_a_manifest_that_does_not_match_the_files_protects_them(model_dir, tmp_path, manifest):
    """Second review of issue 38: the manifest was trusted by name, so one left behind (`rm -r out/*` keeps the
    hidden file) or forged made liteclip replace or delete the user's files. Files are now matched by SHA-256."""
    import json

    from liteclip.errors import InputError

    out = tmp_path / "out"
    export_timm(CLIP.from_pretrained(model_dir), out)
    recorded = json.loads((out / ".liteclip-written.json").read_text())
    if manifest == "edited":  # a file liteclip wrote, changed by the user since
        (out / "config.json").write_text('{"architecture": "mine"}')
    else:
        for name in ("config.json", "model.safetensors"):
            (out / name).unlink()
            (out / name).write_text(f"the user's own {name}")
        if manifest == "forged names":
            (out / ".liteclip-written.json").write_text(json.dumps({"names": recorded["names"], "files": {}}))
        elif manifest == "forged hashes":
            recorded["files"]["config.json"] = "0" * 64
            (out / ".liteclip-written.json").write_text(json.dumps(recorded))
    before = snapshot(out)
    with pytest.raises(InputError, match="changed since"):
        export_timm(CLIP.from_pretrained(model_dir), out)
    assert_user_files_untouched(out, before, exactly=True)


def test_a_model_folder_an_older_liteclip_saved_without_a_manifest_is_still_replaced(model_dir, tmp_path):
    saved = tmp_path / "older"
    CLIP.from_pretrained(model_dir).save_pretrained(saved)
    (saved / ".liteclip-written.json").unlink()  # as folders were saved before manifests
    (saved / "notes.txt").write_text("mine")
    CLIP.from_pretrained(model_dir).save_pretrained(saved)
    assert (saved / "notes.txt").read_text() == "mine" and (saved / ".liteclip-written.json").is_file()

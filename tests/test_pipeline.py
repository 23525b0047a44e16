"""ZeroShotPipeline (and ImageSearch where a test covers both) on a tiny model saved to a temporary directory."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from liteclip.errors import ModelLoadError
from liteclip.pipeline import ZeroShotPipeline
from liteclip.search.image_search import ImageSearch
from tests.conftest import draw_image

LABELS = ['a photo of a dog', 'a photo of a cat', 'the photo of a human baby']


@pytest.fixture
def images(tmp_path):
    return [draw_image(tmp_path / "examples" / f"{name}.jpg", color)
            for name, color in (("cat", (200, 30, 30)), ("dog", (30, 200, 30)), ("baby", (30, 30, 200)))]


def test_liteclip_usage_verbatim(model_dir, images, monkeypatch, capsys):
    monkeypatch.chdir(model_dir.parent)  # ZeroShotPipeline() loads ./model
    from liteclip import ZeroShotPipeline as FromPackage

    pipeline = FromPackage()
    predictions = pipeline.predict('examples/cat.jpg', ['a photo of a dog', 'a photo of a cat', 'the photo of a human baby'])
    for label, prob in predictions:
        print(f"{label}: {prob*100:.2f}%")
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and all(line.endswith("%") for line in printed)
    assert sorted(label for label, _ in predictions) == sorted(LABELS)
    probs = [p for _, p in predictions]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_probabilities_are_softmax_of_scaled_logits(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir)
    result = dict(pipeline.predict(images[0], LABELS))
    model = pipeline.model
    with torch.no_grad():
        image_embed = pipeline.encode_images([images[0]])
        tokens = model.tokenizer(LABELS, padding=True, return_tensors="pt").to(image_embed.device)
        text_embeds = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        expected = torch.softmax(model.logit_scale.exp() * image_embed @ text_embeds.t(), dim=-1)[0]
    for label, prob in zip(LABELS, expected.tolist()):
        assert result[label] == pytest.approx(prob, abs=1e-5)


def test_batched_equals_single_and_accepts_every_image_type(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir)
    singles = [pipeline.predict(path, LABELS) for path in images]
    batched = pipeline.predict(images, LABELS)
    for single, in_batch in zip(singles, batched):
        assert [l for l, _ in single] == [l for l, _ in in_batch]
        assert [p for _, p in single] == pytest.approx([p for _, p in in_batch], abs=1e-5)
    pil = Image.open(images[0])
    array = np.asarray(pil.convert("RGB"))
    for other in (pil, array, str(images[0])):
        result = pipeline.predict(other, LABELS)
        assert [l for l, _ in result] == [l for l, _ in singles[0]]
        assert [p for _, p in result] == pytest.approx([p for _, p in singles[0]], abs=1e-5)


def test_top_k(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir)
    full = pipeline.predict(images[0], LABELS)
    assert pipeline.predict(images[0], LABELS, top_k=2) == full[:2]


def test_cached_labels_do_not_call_the_text_tower_again(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir)
    calls = {"n": 0}
    original = pipeline.model.encode_text

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    pipeline.model.encode_text = counting
    pipeline.predict(images[0], LABELS)
    first = calls["n"]
    pipeline.predict(images[1], LABELS)
    pipeline.predict(images, LABELS)
    assert first == 1 and calls["n"] == 1
    pipeline.predict(images[0], LABELS[:2])
    assert calls["n"] == 2  # a different label set is encoded


def test_templates_are_averaged(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    embeds = pipeline.encode_labels(["cat", "dog"], templates)
    from liteclip.embedding import encode_texts

    each = encode_texts(pipeline.model, ["a photo of a cat.", "a drawing of a cat."])
    expected = torch.nn.functional.normalize(each.mean(dim=0), dim=-1)
    torch.testing.assert_close(embeds[0], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="has no"):
        pipeline.encode_labels(["cat", "dog"], ["no placeholder"])


@pytest.mark.parametrize("bad_labels, message", [(["only one"], "at least 2 labels"), (["a", "a"], "distinct")])
def test_bad_labels(model_dir, images, bad_labels, message):
    with pytest.raises(ValueError, match=message):
        ZeroShotPipeline(model_dir).predict(images[0], bad_labels)


def test_bad_images(model_dir, tmp_path):
    pipeline = ZeroShotPipeline(model_dir)
    with pytest.raises(FileNotFoundError, match="missing.jpg does not exist"):
        pipeline.predict(tmp_path / "missing.jpg", LABELS)
    (tmp_path / "broken.jpg").write_bytes(b"definitely not an image")
    with pytest.raises(ValueError, match="broken.jpg: cannot decode image"):
        pipeline.predict(tmp_path / "broken.jpg", LABELS)
    with pytest.raises(ValueError, match="uint8"):
        pipeline.predict(np.zeros((8, 8, 3), dtype=np.float32), LABELS)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="train.py --config configs/demo.yaml"):
        ZeroShotPipeline(tmp_path / "nowhere")


def test_an_undecodable_file_is_skipped_by_index_and_batched_predict_and_named_when_alone(model_dir, tmp_path, caplog):
    folder = tmp_path / "photos"
    for i in range(3):
        draw_image(folder / f"{i}.png", (70 * i, 90, 120))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    search = ImageSearch(ZeroShotPipeline(model_dir))
    with caplog.at_level("WARNING"):
        assert search.index(folder, tmp_path / "photos.index", show_progress=False) == 3
    assert [row.file.name for row in search.skipped] == ["broken.jpg"] and "broken.jpg" in caplog.text
    assert len(search.paths) == 3 and all(path.name != "broken.jpg" for path in search.paths)
    assert len(search.search("a red circle", top_k=5)) == 3

    pipeline = ZeroShotPipeline(model_dir)
    batched = pipeline.predict([folder / "0.png", folder / "broken.jpg", folder / "1.png"], LABELS)
    assert batched[1] == [] and len(batched[0]) == len(batched[2]) == 3
    single = pipeline.predict(folder / "0.png", LABELS)
    assert [label for label, _ in batched[0]] == [label for label, _ in single]
    assert [p for _, p in batched[0]] == pytest.approx([p for _, p in single], abs=1e-5)
    with pytest.raises(ValueError, match="broken.jpg: cannot decode image"):
        pipeline.predict(folder / "broken.jpg", LABELS)


def test_top_k_below_one_and_a_missing_cuda_device_are_clear_errors(model_dir, images, monkeypatch):
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(images, show_progress=False)
    with pytest.raises(ValueError, match="top_k=0"):
        search.search("a cat", top_k=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA, GPU or not
    with pytest.raises(ValueError, match="no CUDA device"):
        ZeroShotPipeline(model_dir, device="cuda")


def test_conveniences_callable_preprocess_and_label_mistakes(model_dir, images):
    pipeline = ZeroShotPipeline(model_dir)
    assert pipeline(images[0], LABELS) == pipeline.predict(images[0], LABELS)
    pil = Image.open(images[0])
    pixels = pipeline.preprocess(pil)
    assert pixels.shape == (3, 32, 32) and torch.equal(pixels, pipeline.preprocess(images[0]))
    with pytest.raises(ValueError, match="single string 'a photo of a cat'"):
        pipeline.predict(images[0], "a photo of a cat")
    for top_k in (0, -1):
        with pytest.raises(ValueError, match=f"top_k={top_k}"):
            pipeline.predict(images[0], LABELS, top_k=top_k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_predicts_and_indexes_like_the_float_one(model_dir, images, tmp_path, dtype):
    from liteclip import CLIP

    assert next(CLIP.from_pretrained(model_dir, dtype=dtype).parameters()).dtype == dtype
    full = ZeroShotPipeline(model_dir).predict(images, LABELS)
    half = ZeroShotPipeline(model_dir, dtype=dtype).predict(images, LABELS)
    for full_row, half_row in zip(full, half):
        assert dict(half_row) == pytest.approx(dict(full_row), abs=0.05)
    search = ImageSearch(ZeroShotPipeline(model_dir, dtype=dtype))
    search.index(images, show_progress=False)
    assert search.embeddings.dtype == torch.float32 and len(search.search("a photo of a cat", top_k=2)) == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_long_list_is_classified_a_batch_at_a_time_with_the_same_results(model_dir, images, tmp_path, num_workers,
                                                                           monkeypatch):
    pipeline = ZeroShotPipeline(model_dir)
    (tmp_path / "broken.jpg").write_bytes(b"no")
    many = images * 2 + [tmp_path / "broken.jpg"] + images  # 10 entries, one undecodable, over 4 batches of 3
    calls, iterations = [], []
    original = pipeline._probabilities
    pipeline._probabilities = lambda pixels, labels: calls.append(len(pixels)) or original(pixels, labels)
    real_iter = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda loader: iterations.append(loader) or real_iter(loader))
    batched = pipeline.predict(many, LABELS, batch_size=3, show_progress=False, num_workers=num_workers)
    assert len(iterations) == 1  # the progress bar must not start the loader (and its workers) a second time
    assert max(calls) <= 3 and sum(calls) == 9  # never more than one batch of pixels at a time
    assert batched[6] == [] and len(batched) == 10
    for item, result in zip(many, batched):
        if result:
            single = pipeline.predict(item, LABELS)
            assert [l for l, _ in result] == [l for l, _ in single]
            assert [p for _, p in result] == pytest.approx([p for _, p in single], abs=1e-5)


# ------------------------------------------------------------------------- messy Python calls (issue 26)


def test_labels_from_a_generator_are_taken_and_non_texts_or_empty_ones_refused(model_dir, images):
    from liteclip.errors import InputError

    pipeline = ZeroShotPipeline(model_dir, device="cpu")
    assert pipeline.predict(images[0], (label for label in LABELS)) == pipeline.predict(images[0], LABELS)
    for bad in ([1, 2], ["a cat", None], ["a cat", "  "]):
        with pytest.raises(InputError, match="every label must be a non-empty text"):
            pipeline.predict(images[0], bad)
    with pytest.raises(InputError, match="has no pixels"):
        pipeline.predict(np.zeros((0, 0, 3), dtype=np.uint8), LABELS)


def test_a_diverged_model_is_refused_when_loaded_used_or_saved_never_printed_as_nan_percent(model_dir, images,
                                                                                           tmp_path, capsys):
    """Issue 38: a NaN model predicted `nan%` for every label."""
    import shutil

    from safetensors.torch import load_file, save_file

    from liteclip import CLIP
    from liteclip.cli import main
    from liteclip.errors import NonFiniteError

    diverged = tmp_path / "diverged"
    shutil.copytree(model_dir, diverged)
    weights = load_file(diverged / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, diverged / "model.safetensors")
    with pytest.raises(NonFiniteError, match="hold NaN or infinity"):
        CLIP.from_pretrained(diverged)
    assert main(["predict", str(images[0]), "--model-dir", str(diverged), "--labels", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert "hold NaN or infinity" in err and "nan%" not in err and "Traceback" not in err

    model = CLIP.from_pretrained(model_dir)
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    pipeline = ZeroShotPipeline(model=model, device="cpu")
    with pytest.raises(NonFiniteError, match="not finite"):
        pipeline.predict(images[0], LABELS)
    with pytest.raises(NonFiniteError, match="nothing was written"):
        model.save_pretrained(tmp_path / "never")
    assert not (tmp_path / "never").exists()

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from liteclip.data.images import load_image
from liteclip.data.transforms import (MAX_RESIZED_PIXELS, build_transforms, crop_or_pad, eval_transform,
                                       random_crop_box, resize, resized_shape)

DATA_CONFIG = {"input_size": (3, 24, 24), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_pct": 0.75,
               "interpolation": "bicubic"}


def test_eval_transform_resizes_crops_and_normalises_with_the_tower_statistics():
    _, evaluate = build_transforms(DATA_CONFIG)
    image = np.full((40, 60, 3), 255, dtype=np.uint8)
    out = evaluate(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    expected = (1.0 - torch.tensor(DATA_CONFIG["mean"])) / torch.tensor(DATA_CONFIG["std"])
    torch.testing.assert_close(out[:, 12, 12], expected)


def test_eval_center_crop_keeps_the_middle():
    _, evaluate = build_transforms(DATA_CONFIG)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :2] = 255  # a bright strip at the far left edge is cropped away at crop_pct 0.75
    out = evaluate(image)
    assert out[0].max() < (0.5 - 0.5) / 0.2 + 0.5


def test_train_transform_is_random_but_seeded_by_torch():
    train, _ = build_transforms(DATA_CONFIG, crop_scale=(0.3, 1.0))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    torch.manual_seed(1)
    a, b = train(image), train(image)
    torch.manual_seed(1)
    a_again = train(image)
    assert a.shape == (3, 24, 24)
    assert not torch.equal(a, b)
    assert torch.equal(a, a_again)


def test_no_horizontal_flip_by_default():
    train, _ = build_transforms(DATA_CONFIG, crop_scale=(1.0, 1.0))
    image = np.zeros((24, 24, 3), dtype=np.uint8)
    image[:, :8] = 255  # left third bright
    for seed in range(10):
        torch.manual_seed(seed)
        out = train(image)
        assert out[:, :, :4].mean() > out[:, :, -4:].mean()  # left stays left


IMPORT_AND_COUNT_REQUESTS = """
import urllib.request
requests = []
urllib.request.OpenerDirector.open = lambda self, url, *args, **kwargs: requests.append(url) or 1 / 0
import liteclip.data.transforms
print(len(requests))
"""


def test_importing_the_transforms_asks_no_server_unless_the_user_allows_albumentations_update_check():
    def requests_made(environment: dict[str, str]) -> int:
        result = subprocess.run([sys.executable, "-c", IMPORT_AND_COUNT_REQUESTS], env=environment,
                                capture_output=True, text=True, check=True, timeout=120)
        return int(result.stdout.strip().splitlines()[-1])

    environment = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    assert requests_made(environment) == 0
    assert requests_made({**environment, "NO_ALBUMENTATIONS_UPDATE": "0"}) == 1  # the user's setting stands


# --- the same pixels as the checkpoint's own library, on photos of any size and shape ---------------------------

def pictures(folder: Path) -> list[Path]:
    """Non-square pictures as a user has them: small and huge, landscape and portrait, PNG and JPEG, each with a
    smooth gradient, sharp one-pixel stripes (which alias when shrunk without antialiasing) and noise."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for width, height, suffix in [(90, 70, ".png"), (71, 93, ".jpg"), (333, 200, ".jpg"), (2400, 1100, ".png"),
                                  (1100, 2401, ".jpg"), (31, 29, ".png")]:
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
        pixels[:, width // 3: 2 * width // 3] = 255 * (x[:, width // 3: 2 * width // 3] % 2)[..., None]
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        path = folder / f"picture_{width}x{height}{suffix}"
        Image.fromarray(pixels).save(path, **({"quality": 92} if suffix == ".jpg" else {}))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def picture_files(tmp_path_factory) -> list[Path]:
    return pictures(tmp_path_factory.mktemp("pictures"))


def opened(path: Path) -> Image.Image:
    """How a user of the library itself opens a picture."""
    with Image.open(path) as image:
        return image.convert("RGB")


TIMM_VARIANTS = [{}, {"crop_pct": 0.95, "interpolation": "bilinear"}, {"crop_pct": 0.9, "crop_mode": "squash"},
                 {"crop_pct": 1.0, "crop_mode": "border"}, {"crop_pct": 0.875, "input_size": (3, 40, 40)}]


@pytest.mark.parametrize("overlay", TIMM_VARIANTS, ids=lambda overlay: ",".join(map(str, overlay.values())) or "as is")
def test_a_timm_tower_sees_the_pixels_of_timms_own_eval_transform(overlay, picture_files, tiny_text_dir):
    import timm

    from liteclip.config import config_from_dict
    from liteclip.model import ImageEncoder
    from tests.conftest import tiny_config_dict

    config = config_from_dict(tiny_config_dict(tiny_text_dir)).model.image
    config = config.__class__(**{**config.__dict__, "image_size": None})  # the tower's own input size
    encoder = ImageEncoder(config)
    tower = timm.create_model("test_convnext3", pretrained=False, pretrained_cfg_overlay=overlay)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=tower))
    encoder.data_config = {**timm.data.resolve_model_data_config(tower), "resize_with": "pil"}
    ours = eval_transform(encoder.data_config)
    for path in picture_files:
        expected = theirs(opened(path))
        torch.testing.assert_close(ours(load_image(path)), expected, atol=1e-5, rtol=0, msg=f"{path.name}")
    assert ImageEncoder(config).data_config["resize_with"] == "pil"  # what liteclip's own timm tower gets


def test_an_hf_clip_checkpoint_sees_the_pixels_of_its_image_processor_and_predicts_as_transformers(
        picture_files, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessor, CLIPModel

    from liteclip import ZeroShotPipeline
    from tests.weights.test_huggingface import write_tiny_hf_clip

    folder = write_tiny_hf_clip(tmp_path / "clip")
    # a shorter side larger than the crop, so the crop's rounding of an odd surplus shows
    CLIPImageProcessor(size={"shortest_edge": 35}, crop_size={"height": 30, "width": 30}).save_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)  # the one transformers picks for a user
    assert isinstance(processor, CLIPImageProcessor)
    labels = ["a photo of a cat", "a photo of a dog", "a diagram"]
    reference = CLIPModel.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(labels, padding=True, return_tensors="pt")
    pipeline = ZeroShotPipeline(str(folder), device="cpu")
    for path in picture_files:
        pixels = processor(images=opened(path), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pipeline.preprocess(path)[None], pixels, atol=1e-5, rtol=0, msg=path.name)
        with torch.no_grad():
            expected = reference(pixel_values=pixels, **tokens).logits_per_image.softmax(dim=-1)[0]
        predicted = dict(pipeline.predict(path, labels))
        assert [predicted[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5), path.name


def test_a_siglip_checkpoint_sees_the_pixels_of_its_image_processor_and_predicts_as_transformers(
        picture_files, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    from liteclip import ZeroShotPipeline
    from tests.weights.test_huggingface import write_tiny_siglip

    folder = write_tiny_siglip(tmp_path / "siglip")
    processor = AutoImageProcessor.from_pretrained(folder)
    labels = ["a photo of a dog", "a boy jumping", "a red square"]
    reference = SiglipModel.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(labels, padding="max_length", max_length=12, return_tensors="pt")
    pipeline = ZeroShotPipeline(str(folder), device="cpu")
    for path in picture_files:
        pixels = processor(images=opened(path), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pipeline.preprocess(path)[None], pixels, atol=1e-5, rtol=0, msg=path.name)
        with torch.no_grad():
            expected = reference(pixel_values=pixels, input_ids=tokens["input_ids"]).logits_per_image.sigmoid()[0]
        predicted = dict(pipeline.predict(path, labels))
        assert [predicted[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5), path.name


def test_the_pil_backend_of_transformers_is_followed_too(picture_files, tmp_path):
    """transformers' PIL processors (the only ones before version 5) resize with PIL, a level or two apart from
    torchvision in a few pixels: a checkpoint whose processor is one is preprocessed with PIL."""
    import transformers

    from liteclip.weights.huggingface import image_processor_data_config, processor_resizing
    from tests.weights.test_huggingface import write_tiny_hf_clip

    pil_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    folder = write_tiny_hf_clip(tmp_path / "clip")
    processor = pil_processor(size={"shortest_edge": 33}, crop_size={"height": 30, "width": 30})
    data_config = image_processor_data_config(str(folder), 30)
    data_config.update(processor_resizing(processor))
    assert data_config["resize_with"] == "pil"
    data_config["resize_size"] = 33
    data_config["crop_pct"] = 30 / 33
    for path in picture_files:
        pixels = torch.as_tensor(np.asarray(processor(images=opened(path))["pixel_values"][0]))
        torch.testing.assert_close(eval_transform(data_config)(load_image(path)), pixels, atol=1e-5, rtol=0,
                                   msg=path.name)


@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_an_open_clip_checkpoint_sees_the_pixels_of_its_preprocess_and_predicts_as_open_clip(
        resize_mode, picture_files, tmp_path):
    import open_clip

    from liteclip import ZeroShotPipeline
    from tests.weights.test_openclip import ARCHITECTURES, write_tiny_open_clip

    # a local-dir checkpoint, as open_clip saves one, whose preprocess_cfg asks for the resize mode
    weights = write_tiny_open_clip(tmp_path, "liteclip-test-vit")
    folder = tmp_path / f"checkpoint_{resize_mode}"
    folder.mkdir()
    Path(weights).rename(folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": ARCHITECTURES["liteclip-test-vit"],
        "preprocess_cfg": {"resize_mode": resize_mode, "interpolation": "bicubic", "fill_color": 0}}))
    name = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    labels = ["a boy jumping with skateboard", "a photo of a cat", "two dogs playing in the snow"]
    with torch.no_grad():
        text = model.encode_text(open_clip.get_tokenizer(name)(labels), normalize=True)
    pipeline = ZeroShotPipeline(f"open_clip:{name}", device="cpu")
    assert pipeline.model.data_config["resize_mode"] == resize_mode
    for path in picture_files:
        pixels = preprocess(opened(path))[None]
        torch.testing.assert_close(pipeline.preprocess(path)[None], pixels, atol=1e-5, rtol=0, msg=path.name)
        with torch.no_grad():
            image = model.encode_image(pixels, normalize=True)
            expected = (model.logit_scale.exp() * image @ text.T).softmax(dim=-1)[0]
        predicted = dict(pipeline.predict(path, labels))
        assert [predicted[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5), path.name


# --- training sees what evaluation sees: antialiased -------------------------------------------------------------

def one_pixel_stripes(side: int = 256) -> np.ndarray:
    stripes = np.zeros((side, side, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    return stripes


PLAIN = {"input_size": (3, 32, 32), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "crop_pct": 1.0,
         "interpolation": "bicubic"}


@pytest.mark.parametrize("resizer", ["pil", "torchvision"])
def test_the_training_crop_shrinks_fine_stripes_to_their_mean_grey_not_to_moire(resizer):
    """One-pixel stripes shrunk about 8 times (random crops of 60-100% of a 256 px square, to 32 px): an antialiased
    resize averages them to an even grey; OpenCV's bicubic, which liteclip used before, samples them into bands."""
    train, evaluate = build_transforms({**PLAIN, "resize_with": resizer}, crop_scale=(0.6, 1.0))
    grey_levels = [float((train(one_pixel_stripes(), seed=seed) * 255).std()) for seed in range(20)]
    assert max(grey_levels) < 4.0, grey_levels  # colour jitter moves the grey, never makes it striped
    assert float((evaluate(one_pixel_stripes()) * 255).std()) < 4.0
    old_train, _ = build_transforms({**PLAIN, "resize_with": "opencv"}, crop_scale=(0.6, 1.0))
    assert max(float((old_train(one_pixel_stripes(), seed=seed) * 255).std()) for seed in range(20)) > 30


def test_the_training_crop_is_seeded_by_the_sample_seed_and_covers_the_crop_scale():
    train, _ = build_transforms({**PLAIN, "resize_with": "pil"}, crop_scale=(0.3, 1.0))
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    assert torch.equal(train(image, seed=5), train(image, seed=5))
    assert not torch.equal(train(image, seed=5), train(image, seed=6))
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_crop_box(90, 120, (0.3, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 90
        assert 0.25 <= (right - left) * (bottom - top) / (90 * 120) <= 1.0


def test_a_model_saved_before_the_resize_was_recorded_predicts_with_the_resize_it_was_trained_with(model_dir):
    """A model folder written before liteclip recorded its resize has no resize_with: it keeps OpenCV's resize,
    the one it was trained and evaluated with, checked against that old recipe written out here."""
    import albumentations as A
    import cv2

    from liteclip import ZeroShotPipeline

    saved = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert saved["resize_with"] == "pil"  # what a model saved now records
    del saved["resize_with"]
    (model_dir / "preprocessor_config.json").write_text(json.dumps(saved))
    pipeline = ZeroShotPipeline(str(model_dir), device="cpu")
    assert pipeline.model.data_config["resize_with"] == "opencv"
    size = saved["input_size"][-1]
    old_recipe = A.Compose([A.SmallestMaxSize(max_size=int(round(size / saved["crop_pct"])),
                                              interpolation=cv2.INTER_CUBIC),
                            A.CenterCrop(height=size, width=size),
                            A.Normalize(mean=saved["mean"], std=saved["std"], max_pixel_value=255.0)])
    image = np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    expected = torch.from_numpy(old_recipe(image=image)["image"].transpose(2, 0, 1).copy())
    torch.testing.assert_close(pipeline.preprocess(image), expected, atol=1e-6, rtol=0)


def test_a_strip_hundreds_of_times_longer_than_wide_is_resized_near_its_center_only():
    """Resizing a 2 x 40,000 strip's shorter side to 256 would make a 5-gigapixel image; only the center is
    resized, a level at most from what resizing it whole and cropping gives."""
    config = {**PLAIN, "input_size": (3, 224, 224), "crop_pct": 0.875, "resize_with": "pil"}
    strip = np.random.default_rng(2).integers(0, 256, (2, 40_000, 3), dtype=np.uint8)
    out = eval_transform(config)(strip)
    assert out.shape == (3, 224, 224)
    shorter = np.ascontiguousarray(strip[:, 19_900:20_100])  # the same middle, small enough to resize whole
    height, width = resized_shape(2, 40_000, config)
    assert height * width > MAX_RESIZED_PIXELS
    middle = resize(Image.fromarray(shorter), 256, 256 * 200 // 2, config)  # at the same scale
    expected = crop_or_pad(middle, 224) / 255.0
    assert np.abs(out.numpy().transpose(1, 2, 0) - expected).max() <= 1.5 / 255


@pytest.mark.parametrize("resizer", ["pil", "torchvision", "opencv"])
@given(height=st.integers(1, 700), width=st.integers(1, 700), mode=st.sampled_from(["shortest", "squash", "longest"]),
       crop_pct=st.sampled_from([0.5, 0.875, 0.95, 1.0]))
@settings(max_examples=40, deadline=None)
def test_any_picture_size_gives_the_towers_input_size_and_finite_values(resizer, height, width, mode, crop_pct):
    config = {**PLAIN, "input_size": (3, 24, 24), "resize_mode": mode, "crop_pct": crop_pct, "resize_with": resizer}
    image = np.full((height, width, 3), 200, dtype=np.uint8)
    train, evaluate = build_transforms(config, crop_scale=(0.3, 1.0))
    for out in (train(image, seed=0), evaluate(image)):
        assert out.shape == (3, 24, 24) and torch.isfinite(out).all()


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.sampled_from(["pil", "torchvision", "opencv", "squash", "longest",
                                                          "floor", "border", "random", "area"]),
                   st.lists(st.one_of(st.integers(-5, 300), st.floats(allow_nan=True)), max_size=4))


@given(changes=st.dictionaries(st.sampled_from(["input_size", "mean", "std", "crop_pct", "interpolation",
                                                "resize_with", "resize_mode", "crop_mode", "crop_rounding",
                                                "resize_size", "fill"]), VALUES, max_size=3))
@settings(max_examples=150, deadline=None)
def test_a_preprocessing_config_from_a_model_folder_gives_pixels_or_one_line_naming_its_key(changes):
    """A saved model's preprocessor_config.json is a file from elsewhere: any value in it gives finite pixels of
    the input size, or a ConfigError naming the key, never a traceback from deep inside a resize."""
    from liteclip.errors import ConfigError

    config = {**PLAIN, "input_size": (3, 8, 8), **changes}
    image = np.full((13, 9, 3), 90, dtype=np.uint8)
    try:
        train, evaluate = build_transforms(config, crop_scale=(0.5, 1.0))
    except ConfigError as error:
        assert "\n" not in str(error) and any(f"{key}=" in str(error) for key in changes), str(error)
        return
    side = int(config["input_size"][-1])
    for out in (train(image, seed=1), evaluate(image)):
        assert out.shape == (3, side, side) and torch.isfinite(out).all()


@pytest.mark.parametrize("changes", [{"resize_with": "opencv"}, {"resize_with": "pil", "crop_pct": 2.0},
                                     {"resize_with": "torchvision", "crop_pct": 2.0},
                                     {"resize_with": "pil", "crop_mode": "border", "mean": (2.0, -0.5, 0.5)}])
def test_a_thin_strip_stays_bounded_under_every_resizer_even_one_smaller_than_the_crop(changes):
    """A 1 x 60,000 strip resized whole would take gigabytes: an older model's OpenCV resize, and a resize to a
    shorter side below the crop (crop_pct above 1, so the strip is padded), go through the bounded path too; a
    border fill from a mean outside [0, 1] is clipped to a grey level."""
    config = {**PLAIN, "input_size": (3, 224, 224), "crop_pct": 0.875, **changes}
    out = eval_transform(config)(np.full((1, 60_000, 3), 77, dtype=np.uint8))
    assert out.shape == (3, 224, 224) and torch.isfinite(out).all()

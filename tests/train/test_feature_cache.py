"""Cached features of a locked image tower, and the K augmented views that keep augmentation at cached cost."""

import pytest
import torch

from liteclip import build_model
from liteclip.config import ConfigError
from liteclip.data import build_datasets, load_splits
from liteclip.data.captions import SeededSampler
from liteclip.train.feature_cache import check_views_fit, use_feature_cache
from liteclip.precision import Precision
from tests.train.test_loop import assert_a_crashed_run_resumes_to_the_same_weights, tiny_config

FP32 = Precision(None, "cpu")
LOCKED = ("model.image.tune=locked", "train.cache_image_features=true")


@pytest.fixture
def cached_views(tmp_path):
    """A locked tiny tower's datasets with 3 cached views of each training image."""
    config = tiny_config(tmp_path, *LOCKED, "train.cached_views=3", "data.demo_num_images=40")
    splits = load_splits(config.data)  # generates the demo data, its text tower included
    torch.manual_seed(0)
    model = build_model(config.model)
    datasets = build_datasets(config.data, model.data_config, splits)
    cached = use_feature_cache(model, datasets, tmp_path / "cache", torch.device("cpu"), FP32, views=3,
                               transform_key="test")
    return model, datasets, cached


def test_each_training_image_has_k_different_views_and_evaluation_one(cached_views):
    _, datasets, cached = cached_views
    views = cached["train"].features
    assert views.shape[:2] == (3, len(datasets["train"].images))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (views[a] - views[b]).abs().amax(dim=1).min() > 0  # every image's views differ
    assert cached["val"].features.shape == (len(datasets["val"].images), views.shape[2])  # one, untransformed
    assert cached["test"].features.ndim == 2


def test_the_views_are_the_training_transform_seeded_per_view_and_image(cached_views, tmp_path):
    from liteclip.data.images import load_image
    from liteclip.train.feature_cache import view_seed

    model, datasets, cached = cached_views
    train = datasets["train"]
    image = load_image(train.images[4].image_path)
    with torch.no_grad():
        expected = model.image_features(train.transform(image, view_seed(2, 4))[None])[0]
    torch.testing.assert_close(cached["train"].features[2, 4], expected, atol=1e-5, rtol=1e-5)
    # a second call reads the cache instead of encoding again
    again = use_feature_cache(model, datasets, tmp_path / "cache", torch.device("cpu"), FP32, views=3,
                              transform_key="test")
    assert torch.equal(again["train"].features, cached["train"].features)


def test_every_view_is_used_over_epochs_and_each_epoch_draws_the_same_for_the_same_seed(cached_views):
    _, _, cached = cached_views
    train = cached["train"]
    sampler = SeededSampler(range(len(train)), seed=0)
    used = set()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        for key in sampler:
            features = train[key]["image_features"]
            image = train[key]["image_index"]
            (view,) = [v for v in range(3) if torch.equal(train.features[v, image], features)]
            used.add(view)
    assert used == {0, 1, 2}
    sampler.set_epoch(1)
    first = [train[key]["image_features"] for key in sampler]
    assert all(torch.equal(a, train[key]["image_features"]) for a, key in zip(first, sampler))


def test_a_run_over_cached_views_resumes_with_the_same_weights(tmp_path, monkeypatch):
    assert_a_crashed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, *LOCKED, "train.cached_views=2",
                                                     "train.epochs=3", "data.demo_num_images=40")


def test_more_views_than_memory_holds_and_views_without_the_cache_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"train.cached_views=100000 needs .* GiB .* lower train.cached_views to "
                                          r"at most \d+"):
        check_views_fit(100_000, 6000, 1280)
    check_views_fit(4, 6000, 1280)  # Flickr8K's training images with Lite0 features: 123 MB
    with pytest.raises(ConfigError, match="train.cached_views=2 needs train.cache_image_features: true"):
        tiny_config(tmp_path, "train.cached_views=2")
    with pytest.raises(ConfigError, match="train.cached_views=0 must be >= 1"):
        tiny_config(tmp_path, *LOCKED, "train.cached_views=0")


def test_swapped_files_with_their_stamps_restored_are_encoded_again_and_a_damaged_cache_is_recomputed(tmp_path, caplog):
    """Issue 38: the cache was keyed on (size, mtime), so two same-size files swapped with their stamps restored
    kept each other's features; a truncated cache file was a raw safetensors traceback."""
    import os

    from liteclip.train.feature_cache import cached_image_features, feature_cache_key
    from tests.conftest import draw_image

    first, second = draw_image(tmp_path / "a.bmp", (200, 20, 20)), draw_image(tmp_path / "b.bmp", (20, 20, 200))
    assert first.stat().st_size == second.stat().st_size  # same size: only the content tells them apart
    config = tiny_config(tmp_path, *LOCKED, "data.demo_num_images=20")
    load_splits(config.data)  # the demo's own text tower is written with its data
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    cache = tmp_path / "cache"
    before = cached_image_features(model, [first, second], cache, torch.device("cpu"), FP32)
    stamps = [(path.stat().st_atime_ns, path.stat().st_mtime_ns) for path in (first, second)]
    contents = first.read_bytes(), second.read_bytes()
    first.write_bytes(contents[1])
    second.write_bytes(contents[0])
    for path, times in zip((first, second), stamps):
        os.utime(path, ns=times)
    after = cached_image_features(model, [first, second], cache, torch.device("cpu"), FP32)
    torch.testing.assert_close(after, before.flip(0))
    damaged = cache / f"image_features_{feature_cache_key(model, [first, second], FP32)}.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        again = cached_image_features(model, [first, second], cache, torch.device("cpu"), FP32)
    torch.testing.assert_close(again, after)
    assert "is damaged" in caplog.text

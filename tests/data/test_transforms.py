import os
import subprocess
import sys

import numpy as np
import torch

from liteclip.data.transforms import build_transforms

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

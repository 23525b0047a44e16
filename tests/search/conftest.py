"""Fixtures of the search wing's tests: a folder of photos, and encoders that count or stop."""

import pytest

from liteclip.search import image_search as image_search_module
from tests.conftest import draw_image


@pytest.fixture
def photos(tmp_path):
    """12 drawn photos of distinct contents and sizes."""
    folder = tmp_path / "photos"
    for i in range(12):
        draw_image(folder / f"{i:02d}.png", (20 * i, 255 - 20 * i, (70 * i) % 255), size=32 + i)
    return folder


def stop_encoding_at_chunk(monkeypatch, number: int):
    """Makes indexing stop (KeyboardInterrupt, as Ctrl-C) when it starts encoding its `number`th chunk; returns the
    real encoder, for the test to put back."""
    real, calls = image_search_module.encode_decodable_image_files, []

    def stopping(model, paths, *args, **kwargs):
        calls.append(len(paths))
        if len(calls) == number:
            raise KeyboardInterrupt("stopped")
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(image_search_module, "encode_decodable_image_files", stopping)
    return real

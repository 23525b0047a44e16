"""Listing a folder of images: every readable image once, symlinked folders followed, and what is left out said."""

import logging

from liteclip.data.image_folder import list_images
from tests.conftest import draw_image


def test_symlinked_folders_are_followed_once_and_left_out_files_are_counted_by_format(tmp_path, caplog):
    photos = tmp_path / "photos"
    draw_image(photos / "a.png", (10, 10, 10))
    draw_image(tmp_path / "elsewhere" / "b.jpg", (200, 10, 10))
    (photos / "trip").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (photos / "loop").symlink_to(photos, target_is_directory=True)  # a link back up the tree: walked once
    (photos / "IMG_0001.heic").write_bytes(b"heic bytes")
    (photos / "IMG_0002.HEIC").write_bytes(b"heic bytes")
    (photos / "notes.txt").write_text("x")
    (photos / ".DS_Store").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="liteclip.data.image_folder"):
        found = list_images(photos)
    assert found == [photos / "a.png", photos / "trip" / "b.jpg"]
    assert "left out 3 file(s)" in caplog.text and "2 .heic" in caplog.text and "1 .txt" in caplog.text

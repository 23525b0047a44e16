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


def test_broken_links_fifos_and_unreadable_folders_are_each_named_for_what_they_are(tmp_path, caplog, monkeypatch):
    """Issue 38: broken links and FIFOs were called "not images liteclip reads", and an unreadable subfolder was
    left out without a word."""
    import os

    from liteclip.data import image_folder

    photos = tmp_path / "photos"
    draw_image(photos / "a.png", (10, 10, 10))
    (photos / "moved.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(photos / "pipe.png")
    (photos / "private").mkdir()
    real_scandir = os.scandir

    def scandir(path):  # the suite may run as root, whom chmod 000 does not stop: the OS's error, as it comes
        if os.fspath(path) == str(photos / "private"):
            raise PermissionError(13, "Permission denied", str(photos / "private"))
        return real_scandir(path)

    monkeypatch.setattr(image_folder.os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="liteclip.data.image_folder"):
        assert list_images(photos) == [photos / "a.png"]  # and the FIFO is never opened, so nothing hangs
    assert "1 link(s) that lead to no file, first: " in caplog.text and "moved.jpg" in caplog.text
    assert "1 image name(s) that are not regular files" in caplog.text and "pipe.png" in caplog.text
    assert "1 folder(s) that cannot be read" in caplog.text and "private" in caplog.text
    assert "not images liteclip reads" not in caplog.text


def test_a_listing_is_in_the_order_paths_sort_in_even_where_the_separator_and_a_character_compare_otherwise(
        tmp_path):
    """list_images sorts strings (a million Path comparisons are slow); the order must stay Path's, part by part:
    "a-b/x.png" sorts after "a/z.png" as Paths, though "-" is below "/" as characters."""
    names = ["a/z.png", "a-b/x.png", "a b/y.png", "a.b/w.png", "A/v.png", "a/b/c/u.png", "ab.png", "a/a.png",
             "é/t.png", "a0/s.png"]
    for name in names:
        draw_image(tmp_path / name, (10, 10, 10))
    assert list_images(tmp_path) == sorted(tmp_path / name for name in names)

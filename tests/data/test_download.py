"""The downloader against a local HTTP server on 127.0.0.1 (with Range support), plus check and prepare."""

import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest
from PIL import Image

from liteclip.cli import main
from liteclip.data.captions import DataError
from liteclip.data.download import (Archive, check_dataset, download_dataset, download_file, prepare_images)
from liteclip.data.flickr8k import read_flickr8k
from tests.conftest import draw_image, save_as_phone_photo, upright_picture
from tests.data.conftest import write_original
from tests.user_files import assert_user_files_untouched, plant_user_files, snapshot


def zip_folder(folder, names=None):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and (names is None or path.relative_to(folder).parts[0] in names):
                archive.write(path, path.relative_to(folder))
    return buffer.getvalue()


class Server:
    """Serves in-memory files; honours `Range: bytes=N-`; records the Range headers it saw."""

    def __init__(self, files):
        self.files = files
        self.ranges = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                header = self.headers.get("Range")
                outer.ranges.append(header)
                start = int(header.split("=")[1].rstrip("-")) if header else 0
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def flickr_zips(tmp_path):
    source = write_original(tmp_path / "source", count=20)
    text = zip_folder(source / "Flickr8k_text")
    images = zip_folder(source, names={"Flicker8k_Dataset"})
    return {"Flickr8k_Dataset.zip": images, "Flickr8k_text.zip": text}


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_good_download_extracts_a_readable_dataset(tmp_path, flickr_zips):
    pins = {name: sha(data) for name, data in flickr_zips.items()}
    with Server(flickr_zips) as server:
        root = download_dataset("flickr8k", tmp_path / "flickr8k", base_url=server.url, sha256=pins,
                                show_progress=False)
    splits = read_flickr8k(root)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    assert not (root / ".downloads").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".extract")]


def test_partial_download_resumes_with_a_range_request(tmp_path, flickr_zips):
    data = flickr_zips["Flickr8k_Dataset.zip"]
    downloads = tmp_path / "dl"
    downloads.mkdir()
    (downloads / "Flickr8k_Dataset.zip.part").write_bytes(data[:1000])
    with Server(flickr_zips) as server:
        path = download_file(Archive(f"{server.url}/Flickr8k_Dataset.zip", sha(data)), downloads, show_progress=False)
        assert server.ranges == ["bytes=1000-"]
    assert path.read_bytes() == data
    assert not (downloads / "Flickr8k_Dataset.zip.part").exists()


def test_corrupted_download_is_refused_and_nothing_is_left(tmp_path, flickr_zips):
    corrupted = dict(flickr_zips)
    body = bytearray(corrupted["Flickr8k_text.zip"])
    body[40] ^= 0xFF  # flip a byte inside the first member's data
    corrupted["Flickr8k_text.zip"] = bytes(body)
    pins = {name: sha(data) for name, data in flickr_zips.items()}  # the published (good) checksums
    root = tmp_path / "flickr8k"
    with Server(corrupted) as server:
        with pytest.raises(DataError, match="checksum mismatch for Flickr8k_text.zip"):
            download_dataset("flickr8k", root, base_url=server.url, sha256=pins, show_progress=False)
    assert not (root / "Flicker8k_Dataset").exists() and not list(root.glob("*.txt"))  # nothing extracted
    assert not list((root / ".downloads").glob("*text*"))  # the bad archive was deleted


def test_crc_is_checked_even_without_a_pinned_checksum(tmp_path, flickr_zips):
    body = bytearray(flickr_zips["Flickr8k_text.zip"])
    body[40] ^= 0xFF
    with Server({"Flickr8k_text.zip": bytes(body)}) as server:
        with pytest.raises(DataError, match="CRC|not a valid zip"):
            download_file(Archive(f"{server.url}/Flickr8k_text.zip"), tmp_path / "dl", show_progress=False)


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot reach"):
        download_file(Archive("http://127.0.0.1:9/none.zip"), tmp_path, show_progress=False, timeout=2)


def test_check_reports_every_bad_row_and_exits_non_zero(tmp_path, capsys):
    root = write_original(tmp_path / "f", count=20)
    token = root / "Flickr8k_text" / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    lines[3] = lines[3].split("\t")[0] + "\t   "  # empty caption, line 4
    lines.append("9999_missing.jpg#0\ta caption for a missing image")  # line 101
    lines.append("../../escape.jpg#0\tsneaky")  # line 102
    token.write_text("\n".join(lines) + "\n")
    (root / "Flicker8k_Dataset" / "1005_photo.jpg").write_bytes(b"truncated")
    split = root / "Flickr8k_text" / "Flickr_8k.devImages.txt"
    split.write_text(split.read_text() + "4242_unknown.jpg\n")

    bad = check_dataset(root, show_progress=False)
    reasons = [str(row) for row in bad]
    assert any("Flickr8k.token.txt:4:" in r and "empty or non-text caption" in r for r in reasons)
    assert any("Flickr8k.token.txt:101:" in r and "missing image" in r for r in reasons)
    assert any("Flickr8k.token.txt:102:" in r and "escapes the image root" in r for r in reasons)
    assert any("Flickr_8k.devImages.txt:4:" in r and "unknown image '4242_unknown.jpg'" in r for r in reasons)
    assert any("1005_photo.jpg" in r and "does not decode" in r for r in reasons)
    assert len(bad) == 5
    assert main(["data", "check", str(root)]) == 1
    assert "5 bad row(s)" in capsys.readouterr().out
    clean = write_original(tmp_path / "clean", count=20)
    assert main(["data", "check", str(clean)]) == 0


def test_check_reports_missing_csv_columns(tmp_path):
    (tmp_path / "c.csv").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(DataError, match="missing column"):
        check_dataset(tmp_path, "c.csv", show_progress=False)


def test_prepare_resizes_and_copies_the_rest(tmp_path):
    source = tmp_path / "src"
    for i in range(3):
        draw_image(source / "Images" / f"{i}.jpg", (10, 20, 30), size=600)
    (source / "captions.txt").write_text("image,caption\n0.jpg,x\n")
    before, after, skipped = prepare_images(source, tmp_path / "dst", size=128, show_progress=False)
    with Image.open(tmp_path / "dst" / "Images" / "0.jpg") as image:
        assert min(image.size) == 128
    assert (tmp_path / "dst" / "captions.txt").read_text() == (source / "captions.txt").read_text()
    assert 0 < after < before
    with pytest.raises(DataError, match="must not lie inside"):
        prepare_images(source, source / "inner", show_progress=False)


def test_prepare_finishes_the_rest_and_lists_what_it_skipped(tmp_path):
    source = tmp_path / "src"
    for i in range(2):
        draw_image(source / "Images" / f"{i}.png", (10, 200, 30), size=300)
    (source / "Images" / "broken.jpg").write_bytes(b"not a jpeg")
    deep = (np.arange(300 * 300, dtype=np.uint32).reshape(300, 300) % 65536).astype(np.uint16)
    Image.fromarray(deep).save(source / "Images" / "deep.png")
    _, _, skipped = prepare_images(source, tmp_path / "dst", size=100, show_progress=False)
    assert [row.file.name for row in skipped] == ["broken.jpg"] and "cannot decode" in skipped[0].reason
    assert sorted(p.name for p in (tmp_path / "dst" / "Images").iterdir()) == ["0.png", "1.png", "deep.png"]
    with Image.open(tmp_path / "dst" / "Images" / "deep.png") as copy:
        assert np.asarray(copy.convert("L")).mean() < 200  # tones kept; PIL's own conversion gives all white


def test_prepare_writes_phone_photos_upright_so_the_copy_needs_no_orientation_tag(tmp_path):
    source = tmp_path / "src"
    (source / "Images").mkdir(parents=True)
    save_as_phone_photo(upright_picture(), source / "Images" / "phone.jpg")
    prepare_images(source, tmp_path / "dst", size=256, show_progress=False)
    with Image.open(tmp_path / "dst" / "Images" / "phone.jpg") as copy:
        assert copy.size == (48, 32) and copy.getexif().get(0x0112, 1) == 1
        assert np.asarray(copy)[16, 10, 0] > 150  # the red block is on the left, where it is in the photo


def test_check_reports_a_captions_file_without_rows_and_keeps_commas_in_the_last_column(tmp_path, capsys):
    draw_image(tmp_path / "img" / "a.png", (200, 100, 0))
    (tmp_path / "empty.csv").write_text("image,caption\n")
    assert [str(row) for row in check_dataset(tmp_path, "empty.csv", show_progress=False)] == [
        f"{tmp_path / 'empty.csv'}:1: no caption rows below the header"]
    assert main(["data", "check", str(tmp_path), "--captions-file", "empty.csv"]) == 1
    (tmp_path / "commas.csv").write_text("image,caption\nimg/a.png,an orange circle in the middle, with a comma\n")
    assert check_dataset(tmp_path, "commas.csv", show_progress=False) == []


def test_prepare_with_its_folders_swapped_refuses_the_dataset_and_leaves_every_file_as_it_was(tmp_path, capsys):
    """Issue 38: `data prepare small orig --size 64` replaced orig's 800x600 photos with 85x64 copies, exit 0."""
    original = tmp_path / "orig"
    for i in range(3):
        draw_image(original / "Images" / f"{i}.jpg", (10, 20, 30 * i), size=300)
    (original / "captions.txt").write_text("image,caption\n0.jpg,x\n")
    assert main(["data", "prepare", str(original), str(tmp_path / "small"), "--size", "64"]) == 0
    before = snapshot(original)
    assert main(["data", "prepare", str(tmp_path / "small"), str(original), "--size", "64"]) == 2
    err = capsys.readouterr().err
    assert "already holds files this command did not write (Images, captions.txt)" in err and "Traceback" not in err
    assert_user_files_untouched(original, before, exactly=True)
    notes = tmp_path / "notes"  # any folder of the user's, not only a dataset
    before = plant_user_files(notes)
    assert main(["data", "prepare", str(original), str(notes), "--size", "64"]) == 2
    assert_user_files_untouched(notes, before, exactly=True)


def test_prepare_again_into_its_own_copy_replaces_it_and_a_failure_midway_leaves_it_as_it_was(tmp_path, monkeypatch):
    source = tmp_path / "src"
    for i in range(3):
        draw_image(source / "Images" / f"{i}.jpg", (10, 20, 30 * i), size=300)
    prepare_images(source, tmp_path / "dst", size=128, show_progress=False)
    prepare_images(source, tmp_path / "dst", size=64, show_progress=False)  # its own earlier copy: replaced
    with Image.open(tmp_path / "dst" / "Images" / "0.jpg") as image:
        assert min(image.size) == 64
    before = snapshot(tmp_path / "dst")
    real_save, saved = Image.Image.save, []

    def full_disk(image, target, *args, **kwargs):
        saved.append(target)
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        return real_save(image, target, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        prepare_images(source, tmp_path / "dst", size=32, show_progress=False)
    assert_user_files_untouched(tmp_path / "dst", before, exactly=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging folder left beside it

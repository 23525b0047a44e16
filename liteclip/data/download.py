"""Getting datasets onto disk and into shape: download (resumable, verified, atomic extraction), check (every bad
row, with file, line and reason) and prepare (a resized copy so training stops decoding full-size JPEGs).

Verification: every archive's own per-member CRC32 is always checked (zipfile.testzip); an archive with a known
SHA-256 in the manifest is checked against it too. A mismatch deletes the download and says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from tqdm.auto import tqdm

from liteclip.files import MANIFEST_NAME, sha256_of, write_directory, written_names
from liteclip.data.captions import BadRow, BadRowPolicy, DataError, read_caption_csv
from liteclip.data.flickr8k import read_flickr8k
from liteclip.data.images import UndecodableImageError, open_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    url: str
    sha256: str | None = None  # None: no published checksum; the zip's CRCs are still verified

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


# The public Flickr8K archives (Hodosh et al. 2013) as mirrored with the original layout. No SHA-256 has been
# published for them; pass --sha256 NAME=HEX to pin the ones you trust.
FLICKR8K_MIRROR = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
DATASETS: dict[str, tuple[str, ...]] = {"flickr8k": ("Flickr8k_Dataset.zip", "Flickr8k_text.zip")}


def dataset_archives(name: str, base_url: str | None = None, sha256: dict[str, str] | None = None) -> list[Archive]:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    base = (base_url or FLICKR8K_MIRROR).rstrip("/")
    return [Archive(f"{base}/{file}", (sha256 or {}).get(file)) for file in DATASETS[name]]


def download_file(archive: Archive, directory: Path, show_progress: bool = True, timeout: float = 60.0) -> Path:
    """Downloads to DIR/NAME, resuming DIR/NAME.part with an HTTP Range request; verifies before renaming."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / archive.filename
    if target.is_file():
        verify_archive(target, archive.sha256)
        return target
    partial = directory / f"{archive.filename}.part"
    offset = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(archive.url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # the partial file is already complete
            response = None
        else:
            raise DataError(f"download of {archive.url} failed: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise DataError(f"cannot reach {archive.url} ({error.reason}); check the network or use --base-url with a "
                        f"mirror") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            total = response.length
            mode = "ab" if resumed else "wb"
            if not resumed:
                offset = 0
            with open(partial, mode) as handle, tqdm(total=(total or 0) + offset, initial=offset, unit="B",
                                                     unit_scale=True, desc=archive.filename,
                                                     disable=not show_progress) as progress:
                for block in iter(lambda: response.read(1 << 20), b""):
                    handle.write(block)
                    progress.update(len(block))
                handle.flush()
                os.fsync(handle.fileno())
    try:
        verify_archive(partial, archive.sha256)
    except DataError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return target


def verify_archive(path: Path, expected_sha256: str | None) -> None:
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256.lower():
            raise DataError(f"checksum mismatch for {path.name}: expected sha256 {expected_sha256}, got {actual}; "
                            f"the download was deleted, run the command again")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except zipfile.BadZipFile as error:
        raise DataError(f"{path.name} is not a valid zip archive ({error}); the download was deleted") from None
    if broken is not None:
        raise DataError(f"{path.name}: member {broken} fails its CRC check; the download was deleted")


def extract(archive_path: Path, root: Path) -> None:
    """Extracts into a staging folder beside `root`, then moves the entries in: never a half-extracted dataset."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for member in archive.infolist():
                destination = (staging / member.filename).resolve()
                if not destination.is_relative_to(staging.resolve()):
                    raise DataError(f"{archive_path.name}: member {member.filename!r} would extract outside {root}")
            archive.extractall(staging)
        for entry in staging.iterdir():
            if entry.name == "__MACOSX":
                continue
            target = root / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_dataset(name: str, root: str | Path, base_url: str | None = None, sha256: dict[str, str] | None = None,
                     keep_archives: bool = False, show_progress: bool = True) -> Path:
    """Downloads, verifies and extracts a dataset into `root`. Re-running resumes where it stopped."""
    root = Path(root)
    downloads = root / ".downloads"
    archives = [download_file(a, downloads, show_progress) for a in dataset_archives(name, base_url, sha256)]
    for path in archives:  # everything is verified before anything is extracted
        extract(path, root)
    if not keep_archives:
        shutil.rmtree(downloads, ignore_errors=True)
    logger.info("%s is ready in %s", name, root)
    return root


# ------------------------------------------------------------------------------------------------------ check


def check_dataset(root: str | Path, captions_file: str | None = None, image_column: str = "image",
                  caption_column: str = "caption", split_column: str | None = None,
                  show_progress: bool = True, encoding: str = "utf-8") -> list[BadRow]:
    """Every bad row of a dataset: missing or undecodable images, empty captions, missing columns, paths escaping
    the root, split entries naming unknown images. Flickr8K layouts are detected; otherwise a CSV/TSV is read."""
    root = Path(root)
    policy = BadRowPolicy("collect")
    is_flickr = captions_file is None or Path(captions_file).name in ("captions.txt", "Flickr8k.token.txt")
    if is_flickr:
        splits = read_flickr8k(root, captions_file, policy=policy, encoding=encoding)
    else:
        splits = read_caption_csv(root / captions_file, root, image_column, caption_column, split_column, 0.1, 0.1, 0,
                                  policy, encoding)
    images = {image.image_path: image for split in splits.values() for image in split}
    for path in tqdm(sorted(images), desc="decoding images", disable=not show_progress, unit="img"):
        try:
            open_rgb(path)
        except UndecodableImageError as error:
            policy.rows.append(BadRow(path, 0, f"image does not decode: {error.reason}"))
    return policy.rows


# ---------------------------------------------------------------------------------------------------- prepare


class PreparedCopy(NamedTuple):
    bytes_before: int  # over the image files copied
    bytes_after: int
    skipped: list[BadRow]  # image files that could not be decoded, left out of the copy


def prepare_images(source: str | Path, destination: str | Path, size: int = 256, quality: int = 95,
                   show_progress: bool = True) -> PreparedCopy:
    """Copies a dataset folder, resizing every image so its shorter side is at most `size` pixels.

    Non-image files (captions, split files) are copied as they are, so the copy is a drop-in data.root. An image
    that cannot be decoded is left out and listed; the rest is still copied. The destination must be new, empty, or
    an earlier copy this command made: a folder holding anything else (a dataset, say, with the arguments swapped)
    is refused before anything is written. The copy is made beside it and appears whole (files.write_directory).
    """
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise DataError(f"{source} is not a folder")
    if destination.resolve().is_relative_to(source.resolve()):
        raise DataError(f"destination {destination} must not lie inside the source {source}")
    if source.resolve().is_relative_to(destination.resolve()):
        raise DataError(f"destination {destination} holds the source {source}; give a new folder beside it")
    refuse_foreign_entries(destination)
    files = sorted(p for p in source.rglob("*") if p.is_file() and ".downloads" not in p.parts)
    totals = {"before": 0, "after": 0}
    skipped: list[BadRow] = []

    def write_contents(staging: Path) -> None:
        for path in tqdm(files, desc="preparing", disable=not show_progress, unit="file"):
            target = staging / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                shutil.copy2(path, target)
                continue
            try:
                image = open_rgb(path, min_size=size)  # JPEG: decoded at reduced scale where possible
            except UndecodableImageError as error:
                skipped.append(BadRow(path, 0, error.reason))
                continue
            totals["before"] += path.stat().st_size
            scale = size / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
            image.save(target, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
            totals["after"] += target.stat().st_size

    owned = {path.relative_to(source).parts[0] for path in files}
    write_directory(destination, write_contents, f"the prepared copy of {source}", owned)
    return PreparedCopy(totals["before"], totals["after"], skipped)


def refuse_foreign_entries(destination: Path) -> None:
    """A DataError if `destination` holds anything but an earlier prepared copy's own files."""
    if not destination.is_dir():
        if destination.exists():
            raise DataError(f"destination {destination} is a file; give a new folder for the copy")
        return
    ours = written_names(destination) | {MANIFEST_NAME}
    foreign = sorted(entry.name for entry in destination.iterdir() if entry.name not in ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(f"destination {destination} already holds files this command did not write ({shown}); "
                        f"nothing was written. `prepare SOURCE DESTINATION` writes a new folder: check the order of "
                        f"the two folders, or give a new or empty destination")

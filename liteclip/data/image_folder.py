"""Folders of image files: listing them (for search indexes), and the ImageFolder class layout
(root/<class name>/*.jpg, as torchvision reads it) as a zero-shot task."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

from liteclip.data.captions import BadRow, LabelledImage, ZeroShotTask
from liteclip.data.images import IMAGE_SUFFIXES  # the suffixes a listing keeps (imported from here too)
from liteclip.errors import DataError, InputError

logger = logging.getLogger(__name__)

DERIVED_MARKER = ".liteclip-derived"  # liteclip.search.store marks the folders of pictures it makes with it


def list_images(folder: str | Path, exclude: Sequence[str | Path] = (), left_out_files: list[BadRow] | None = None
                ) -> list[Path]:
    """Every image file under `folder`, recursively (symlinked folders followed, each real folder once), sorted.

    What is left out is said in warnings: files of other formats (counted by suffix, hidden files aside), links that
    lead nowhere, image names that are not regular files (a FIFO, a device), and folders that cannot be read.
    `exclude`: folders not to enter (an index's own thumbnails, when the index lies inside the folder); a folder
    holding a `.liteclip-derived` marker (the thumbnails and chunks of any index) is never entered either.
    `left_out_files`: where to add the image names left out (links to nothing, pipes, devices) and the folders that
    cannot be read, each with its reason, for a command to list beside the files it could not decode.
    """
    folder = Path(folder)
    if folder.is_file():
        raise InputError(f"{folder} is a file, not a folder; give its folder, or a list of files")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    excluded = {os.path.realpath(path) for path in exclude}
    images, left_out, broken_links, not_files, unreadable = scan(folder, excluded)
    if left_out:
        counts = ", ".join(f"{count} {suffix}" for suffix, count in left_out.most_common())
        logger.warning("%s: left out %d file(s) that are not images liteclip reads (%s); it reads %s, so convert "
                       "any photos among them to JPEG (or install pillow-heif for HEIC)", folder,
                       sum(left_out.values()), counts, " ".join(sorted(IMAGE_SUFFIXES)))
    for found, what, reason in ((broken_links, "link(s) that lead to no file", "a link that leads to no file"),
                                (not_files, "image name(s) that are not regular files (a pipe, a device, a socket)",
                                 "not a regular file (a pipe, a device, a socket)"),
                                ([Path(error.filename or "?") for error in unreadable],
                                 "folder(s) that cannot be read (check their permissions)",
                                 "a folder that cannot be read")):
        if found:
            logger.warning("%s: left out %d %s, first: %s", folder, len(found), what, found[0])
            if left_out_files is not None:
                left_out_files += [BadRow(path, 0, reason) for path in found]
    return [Path(path) for path in images]  # scan lists them sorted


def scan(folder: Path, excluded: set[str]) -> tuple[list[str], Counter, list[Path], list[Path], list[OSError]]:
    """list_images' walk: the image paths (strings) in the order Paths sort in, the other suffixes counted, links to
    nothing, image names that are not regular files, and the errors of folders that cannot be read.

    Each folder's entries are sorted by name and folders entered where they fall among them (depth first), which is
    Path order, part by part: no sort of the whole library holds the interpreter for seconds while the page serves."""
    images, left_out, seen = [], Counter(), set()
    broken_links, not_files, unreadable = [], [], []
    # os.scandir rather than os.walk: its entries know their type, so a library of a million photos costs no stat
    # per photo here, and paths stay strings until the end
    pending: list[Iterator[os.DirEntry] | str] = [os.fspath(folder)]
    while pending:
        top = pending[-1]
        if isinstance(top, str):  # a folder to open
            pending.pop()
            entries = open_folder(top, seen, excluded, unreadable)
            if entries is not None:
                pending.append(iter(entries))
            continue
        entry = next(top, None)
        if entry is None:
            pending.pop()
        elif is_a(entry.is_dir):  # links to folders followed, as os.walk(followlinks=True) does
            pending.append(entry.path)
        else:
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix not in IMAGE_SUFFIXES:
                if not entry.name.startswith("."):
                    left_out[suffix if suffix not in ("", ".") else "(no suffix)"] += 1
            elif is_a(entry.is_file):
                images.append(entry.path)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                broken_links.append(Path(entry.path))
            else:
                not_files.append(Path(entry.path))
    return images, left_out, broken_links, not_files, unreadable


def open_folder(directory: str, seen: set[str], excluded: set[str], unreadable: list[OSError]
                ) -> list[os.DirEntry] | None:
    """A folder's entries sorted by name; None for a folder already listed (a link back up, a second link to it),
    excluded, unreadable (its error kept), or liteclip's own (its thumbnails or chunks, marked)."""
    real = os.path.realpath(directory)
    if real in seen or real in excluded:
        return None
    try:
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as error:
        unreadable.append(error)
        return None
    if any(entry.name == DERIVED_MARKER for entry in entries):
        return None
    seen.add(real)
    return entries


def is_a(test: Any) -> bool:
    """A DirEntry type test; a link it cannot follow (no permission on the way) is not a folder or a file."""
    try:
        return test()
    except OSError:
        return False


def read_image_folder(root: str | Path, templates: Sequence[str] | None = None) -> ZeroShotTask:
    """root/<class name>/*.jpg as a zero-shot task; class names are the folder names with "_" read as a space."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    items = [LabelledImage(path, index) for index, name in enumerate(classes) for path in list_images(root / name)]
    if len(classes) < 2 or not items:
        raise DataError(f"{root} needs at least two class folders with images (root/<class name>/*.jpg)")
    return ZeroShotTask([name.replace("_", " ") for name in classes], items, tuple(templates) if templates else None)

"""Folders of image files: listing them (for search indexes), and the ImageFolder class layout
(root/<class name>/*.jpg, as torchvision reads it) as a zero-shot task."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

from liteclip.data.captions import BadRow, LabelledImage, ZeroShotTask
from liteclip.data.images import IMAGE_SUFFIXES  # the suffixes a listing keeps (imported from here too)
from liteclip.errors import DataError

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
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    excluded = {os.path.realpath(path) for path in exclude}
    images, left_out, seen = [], Counter(), set()
    broken_links, not_files, unreadable = [], [], []
    for directory, subfolders, names in os.walk(folder, followlinks=True, onerror=unreadable.append):
        real = os.path.realpath(directory)
        if real in seen or real in excluded or DERIVED_MARKER in names:  # a link back up, a second link, or ours
            subfolders.clear()
            continue
        seen.add(real)
        for name in names:
            path = Path(directory) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                if not name.startswith("."):
                    left_out[path.suffix.lower() or "(no suffix)"] += 1
            elif path.is_file():
                images.append(path)
            elif path.is_symlink() and not path.exists():
                broken_links.append(path)
            else:
                not_files.append(path)
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
    return sorted(images)


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

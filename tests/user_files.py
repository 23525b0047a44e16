"""One helper for every command that writes: a destination holding the user's files, and a check that they are
byte-identical afterwards (after a refusal, after an error midway, after a crash).

    before = plant_user_files(folder)          # notes, photos, a subfolder, a link: things liteclip never wrote
    ... run the writer ...
    assert_user_files_untouched(folder, before)                 # every planted file as it was
    assert_user_files_untouched(folder, before, exactly=True)   # and nothing else there either
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def plant_user_files(folder: Path, names: tuple[str, ...] = ()) -> dict[str, tuple[str, bytes]]:
    """Fills `folder` with files a user might keep there (and any `names` given, with contents of the user's);
    returns the snapshot assert_user_files_untouched compares against."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "holiday").mkdir(exist_ok=True)
    Image.fromarray(np.full((30, 40, 3), (200, 90, 20), dtype=np.uint8)).save(folder / "holiday" / "beach.jpg")
    (folder / "holiday" / "list.csv").write_text("image,caption\nbeach.jpg,a beach\n")
    (folder / "link-to-notes").symlink_to("notes.txt")
    for name in names:
        (folder / name).write_bytes(f"the user's own {name}\n".encode())
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under `folder` (links not followed): its kind and its bytes (a link's target)."""
    found = {}
    for root, directories, files in os.walk(folder):
        for name in directories + files:
            path = Path(root) / name
            relative = str(path.relative_to(folder))
            if path.is_symlink():
                found[relative] = ("link", os.readlink(path).encode())
            elif path.is_dir():
                found[relative] = ("folder", b"")
            else:
                found[relative] = ("file", path.read_bytes())
    return found


def assert_user_files_untouched(folder: Path, before: dict[str, tuple[str, bytes]], exactly: bool = False) -> None:
    after = snapshot(folder)
    changed = sorted(name for name in before if after.get(name) != before[name])
    assert not changed, f"the user's files changed or went missing: {changed}"
    if exactly:
        added = sorted(set(after) - set(before))
        assert not added, f"entries were left behind: {added}"

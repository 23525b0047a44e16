"""Flickr8K (Hodosh et al. 2013) in both of its public layouts.

Kaggle layout:     ROOT/Images/*.jpg + ROOT/captions.txt ("image,caption" header, five rows per image)
Original layout:   ROOT/Flicker8k_Dataset/*.jpg (sic) + Flickr8k.token.txt ("NAME.jpg#N<TAB>caption")
                   + Flickr_8k.{train,dev,test}Images.txt (6000/1000/1000 images), in ROOT or ROOT/Flickr8k_text/

Splits, first that applies: the Karpathy file dataset_flickr8k.json; the official split files; a seeded split by
image. Never by caption row (liteCLIP split rows, so one photo sat in both train and validation).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from liteclip.data.captions import (BadRowPolicy, CaptionedImage, DataError, group_captions, read_captions_text,
                                    split_by_image)

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
KARPATHY_FILE = "dataset_flickr8k.json"


def _find(root: Path, name: str) -> Path | None:
    for folder in (root, root / "Flickr8k_text"):
        if (folder / name).is_file():
            return folder / name
    return None


def detect_layout(root: Path, captions_file: str | None = None) -> tuple[Path, Path]:
    """Returns (captions file, image folder) for whichever layout `root` holds."""
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist; `python -m liteclip.data download flickr8k "
                        f"--root {root}` fetches Flickr8K")
    if captions_file:
        path = root / captions_file
        if not path.is_file():
            raise DataError(f"data.captions_file: {path} does not exist")
        image_dir = root / "Images" if (root / "Images").is_dir() else root / "Flicker8k_Dataset"
        return path, image_dir
    if (root / "captions.txt").is_file():
        return root / "captions.txt", root / "Images"
    token_file = _find(root, "Flickr8k.token.txt")
    if token_file is not None:
        for name in ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images"):
            if (root / name).is_dir():
                return token_file, root / name
        raise DataError(f"{root}: found {token_file.name} but no Flicker8k_Dataset/ image folder")
    raise DataError(f"{root} holds neither Flickr8K layout: expected captions.txt + Images/ (Kaggle) or "
                    f"Flickr8k.token.txt + Flicker8k_Dataset/ (original)")


def _caption_rows(captions_path: Path, policy: BadRowPolicy, encoding: str = "utf-8"):
    """Yields (line number, image name, caption) from either captions format."""
    with read_captions_text(captions_path, encoding) as handle:
        if captions_path.name.endswith(".token.txt"):
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                key, tab, caption = line.rstrip("\n").partition("\t")
                if not tab:
                    policy.report(captions_path, number, "expected 'NAME.jpg#N<TAB>caption'")
                    continue
                yield number, key.split("#")[0], caption
            return
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise DataError(f"{captions_path}:1: expected the header 'image,caption', got {header}")
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2:
                policy.report(captions_path, number, f"expected 'image,caption', got {row}")
                continue
            # unquoted captions with commas arrive split over several fields
            yield number, row[0], ",".join(row[1:])


def _split_names(root: Path, names: list[str], val_fraction: float, test_fraction: float, seed: int,
                 policy: BadRowPolicy) -> dict[str, list[str]]:
    karpathy = _find(root, KARPATHY_FILE)
    if karpathy is not None:
        entries = json.loads(karpathy.read_text())["images"]
        splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for entry in entries:
            split = "train" if entry["split"] == "restval" else entry["split"]
            splits.setdefault(split, []).append(entry["filename"])
        return _known_only(splits, set(names), karpathy, policy)
    split_paths = {s: _find(root, f) for s, f in SPLIT_FILES.items()}
    if all(split_paths.values()):
        splits = {s: [ln.strip() for ln in p.read_text().splitlines() if ln.strip()] for s, p in split_paths.items()}
        return _known_only(splits, set(names), split_paths, policy)
    return split_by_image(names, val_fraction, test_fraction, seed)


def _known_only(splits: dict[str, list[str]], known: set[str], source, policy: BadRowPolicy) -> dict[str, list[str]]:
    """Drops (and reports) split entries naming images the captions file does not have."""
    kept = {}
    for split, names in splits.items():
        file = source[split] if isinstance(source, dict) else source
        kept[split] = []
        for number, name in enumerate(names, start=1):
            if name in known:
                kept[split].append(name)
            else:
                policy.report(file, number if isinstance(source, dict) else 0,
                              f"split {split} names unknown image {name!r}")
    return kept


def read_flickr8k(root: str | Path, captions_file: str | None = None, val_fraction: float = 0.1,
                  test_fraction: float = 0.1, seed: int = 0, policy: BadRowPolicy | None = None,
                  encoding: str = "utf-8") -> dict[str, list[CaptionedImage]]:
    """Reads Flickr8K (either layout) into image-level train/val/test splits."""
    root = Path(root)
    policy = policy or BadRowPolicy()
    captions_path, image_dir = detect_layout(root, captions_file)
    images = group_captions(_caption_rows(captions_path, policy, encoding), image_dir, captions_path, policy)
    names = _split_names(root, list(images), val_fraction, test_fraction, seed, policy)
    policy.summarise()
    return {split: [images[n] for n in names.get(split, [])] for split in ("train", "val", "test")}

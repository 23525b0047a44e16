"""What every dataset reader produces, and what turns it into batches.

A reader returns, per split, a list of CaptionedImage (one image, all its captions). Splits are always by image, so
one photo never sits in two splits. ImageCaptionDataset yields the sample contract

    {"pixel_values": (3, H, W) float tensor, "caption": str, "image_index": int}

and CaptionCollator stacks images and tokenises captions with dynamic padding (to the longest caption in the batch,
truncated at max_length), which for short captions is several times less text-tower work than padding to 128.
The generic CSV/TSV reader for users' own data lives here too, and so does the contract for zero-shot evaluation
(ZeroShotTask: labelled images and the label texts), which a dataset provides if it has class labels.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from liteclip.data.images import UndecodableImageError, load_image
from liteclip.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class CaptionedImage:
    image_path: Path
    captions: list[str]


def caption_offsets(images: list[CaptionedImage]) -> list[int]:
    """Where each image's captions start in the flat list of every caption of every image, in order."""
    offsets, total = [], 0
    for image in images:
        offsets.append(total)
        total += len(image.captions)
    return offsets


@dataclass(frozen=True)
class LabelledImage:
    image_path: Path
    label: int  # index into the task's labels
    group: str | None = None  # results are also reported per group (the demo: "seen" and "held_out" combinations)


@dataclass(frozen=True)
class ZeroShotTask:
    """Images with class labels, and the texts that name the classes (formatted into templates when given)."""

    labels: list[str]
    items: list[LabelledImage]
    templates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class BadRow:
    file: Path
    line: int  # 1-based line in `file`; 0 when the problem is the file itself
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" if self.line else f"{self.file}: {self.reason}"


@dataclass
class BadRowPolicy:
    """Collects bad rows; with on_bad_row='error' the first one raises (check mode collects them all)."""

    on_bad_row: Literal["error", "skip", "collect"] = "error"
    rows: list[BadRow] = field(default_factory=list)

    def report(self, file: Path, line: int, reason: str) -> None:
        bad = BadRow(Path(file), line, reason)
        if self.on_bad_row == "error":
            raise DataError(f"{bad}\n(set data.on_bad_row: skip to drop bad rows, or run "
                            f"`python -m liteclip.data check ROOT` to list them all)")
        self.rows.append(bad)

    def summarise(self) -> None:
        if self.rows and self.on_bad_row == "skip":
            logger.warning("skipped %d bad rows; first: %s", len(self.rows), self.rows[0])


def read_captions_text(path: Path, encoding: str = "utf-8") -> io.StringIO:
    """A captions file's text, ready for csv; bytes that are not `encoding` are a DataError naming file and line."""
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise DataError(f"{path}:{line}: not valid {encoding} text (byte {data[error.start]:#04x} at column "
                        f"{column}); set data.encoding to the file's encoding (e.g. latin-1, cp1252, utf-16) or "
                        f"save the file as UTF-8") from None
    except LookupError:
        raise DataError(f"data.encoding={encoding!r} is not a text encoding Python knows") from None
    return io.StringIO(text.removeprefix("\ufeff"), newline="")  # a UTF-8 byte-order mark is not a column name


def resolve_image_path(image_root: Path, name: str) -> Path | None:
    """The image's path under image_root (links resolved), or None when the name escapes it (`../`, absolute paths
    elsewhere). The name is judged as written, not where links lead: a root that is a symlink, or image files
    linked in from elsewhere, are the dataset's own layout, while `../` in a captions file is not."""
    root = Path(os.path.abspath(image_root))
    path = Path(os.path.normpath(root / name))
    return path.resolve() if path.is_relative_to(root) else None


def image_key(name: str) -> str:
    """An image name as written in a captions file, normalised so that `img/a.jpg`, `./img/a.jpg` and `img//a.jpg`
    are one image (and so land in one split, never in two)."""
    return os.path.normpath(name.strip())


def group_captions(rows: Iterable[tuple[int, Any, Any]], image_root: Path, source: Path,
                   policy: BadRowPolicy) -> dict[str, CaptionedImage]:
    """Groups (line, image name, caption) rows by image, reporting each bad row once.

    Returns:
        Image name -> CaptionedImage, in first-seen order.
    """
    images: dict[str, CaptionedImage] = {}
    missing: set[str] = set()
    for line, name, caption in rows:
        if not isinstance(name, str) or not name.strip():
            policy.report(source, line, "empty image name")
            continue
        name = image_key(name)
        if not isinstance(caption, str) or not caption.strip():
            policy.report(source, line, f"empty or non-text caption for {name}: {caption!r}")
            continue
        if name not in images:
            try:
                path = resolve_image_path(image_root, name)
                is_file = path is not None and path.is_file()
            except (OSError, ValueError) as error:  # a name the file system cannot look up (over 255 bytes, a NUL)
                reason = getattr(error, "strerror", None) or str(error)[:100]
                policy.report(source, line, f"image name {name[:60]!r}... cannot be looked up ({reason})")
                continue
            if path is None:
                policy.report(source, line, f"image path {name!r} escapes the image root {image_root}")
                continue
            if not is_file:
                if name not in missing:
                    policy.report(source, line, f"{path} is a folder, not an image file" if path.is_dir()
                                  else f"missing image {path}")
                missing.add(name)
                continue
            images[name] = CaptionedImage(path, [])
        images[name].captions.append(caption.strip())
    return images


def split_by_image(names: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded image-level split: every image lands in exactly one of train/val/test."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    num_test = round(len(order) * test_fraction)
    num_val = round(len(order) * val_fraction)
    return {"test": order[:num_test], "val": order[num_test:num_test + num_val], "train": order[num_test + num_val:]}


def csv_records(handle: Iterable[str], delimiter: str, source: Path | str = "the captions file"
                ) -> Iterable[tuple[int, list[str]]]:
    """(line, fields) of every non-empty record, `line` being the 1-based line it starts on: a quoted caption
    that spans several lines does not shift the numbers of the rows after it. A record the csv module cannot read
    (a field past its size limit: an unclosed quote swallowing the lines after it) is a DataError at its line."""
    reader = csv.reader(handle, delimiter=delimiter)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise DataError(f"{source}:{start}: the record starting here cannot be read ({error}); look for a "
                            f"quote (\") that is opened and never closed, or a caption longer than "
                            f"{csv.field_size_limit() // 1024} KiB") from None
        line, start = start, reader.line_num + 1
        if fields and any(field.strip() for field in fields):
            yield line, fields


SWALLOWED_ROW = re.compile(r"\n[^\n]*\.(?:jpe?g|png|webp|bmp|gif|tiff?)\s*[,\t]", re.IGNORECASE)


def caption_row(fields: list[str], header: list[str], caption_column: str, delimiter: str) -> dict[str, str] | str:
    """One record as {column: value}, or the reason it cannot be read. More fields than the header has are an
    unquoted delimiter inside the caption when the caption is the last column (they are joined back into it);
    anywhere else it cannot be told which column they belong to. A quoted field that runs over lines which look like
    rows of their own (an image file name and a delimiter) is a quote left open, swallowing them."""
    swallowed = next((field for field in fields if SWALLOWED_ROW.search(field)), None)
    if swallowed is not None:
        lines = swallowed.rstrip("\n").count("\n")
        return (f"a quote (\") opened in this record is never closed and swallows the {lines} line(s) after it, which "
                f"look like rows of their own; close the quote")
    if len(fields) > len(header):
        if header[-1] != caption_column:
            return (f"{len(fields)} fields where the header has {len(header)}; quote captions that contain "
                    f"{'a tab' if delimiter == chr(9) else 'commas'}: \"a dog, running\"")
        fields = fields[:len(header) - 1] + [delimiter.join(fields[len(header) - 1:])]
    if len(fields) < len(header):
        return f"{len(fields)} fields where the header has {len(header)} ({', '.join(header)})"
    return dict(zip(header, fields))


def read_caption_csv(csv_path: Path, image_root: Path, image_column: str, caption_column: str,
                     split_column: str | None, val_fraction: float, test_fraction: float, seed: int,
                     policy: BadRowPolicy, encoding: str = "utf-8") -> dict[str, list[CaptionedImage]]:
    """Reads a CSV (or TSV, by extension) of image paths and captions into image-level splits."""
    if not csv_path.is_file():
        raise DataError(f"captions file {csv_path} does not exist (data.captions_file is relative to data.root)")
    delimiter = "\t" if csv_path.suffix.lower() in (".tsv", ".tab") else ","
    with read_captions_text(csv_path, encoding) as handle:
        records = csv_records(handle, delimiter, csv_path)
        header_line, header = next(records, (1, []))
        needed = [c for c in (image_column, caption_column, split_column) if c]
        absent = [c for c in needed if c not in header]
        if absent:
            raise DataError(f"{csv_path}: missing column(s) {absent}; the header has {header}. Set "
                            f"data.image_column / data.caption_column / data.split_column to the right names.")
        rows = []
        for line, fields in records:
            row = caption_row(fields, header, caption_column, delimiter)
            if isinstance(row, str):
                policy.report(csv_path, line, row)
                continue
            rows.append((line, row[image_column], row[caption_column], row.get(split_column) if split_column else None))
    if not rows:
        policy.report(csv_path, header_line, "no caption rows below the header")
    images = group_captions(((n, name, cap) for n, name, cap, _ in rows), image_root, csv_path, policy)
    if split_column:
        split_of: dict[str, str] = {}
        for number, name, _, split in rows:
            split = (split or "").strip().lower()
            split = {"validation": "val", "dev": "val"}.get(split, split)
            if split not in ("train", "val", "test"):
                policy.report(csv_path, number, f"split {split!r} is not train, val or test")
                images.pop(image_key(str(name)), None)
            else:
                split_of.setdefault(image_key(str(name)), split)
        return {s: [images[n] for n in images if split_of.get(n) == s] for s in ("train", "val", "test")}
    names = split_by_image(list(images), val_fraction, test_fraction, seed)
    return {s: [images[n] for n in names[s]] for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------------- samples


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch of a run: the trainer reseeds from it, and so does the data order."""
    return seed * 1_000_003 + epoch


def unpack_sample_key(key: int | tuple[int, int]) -> tuple[int, torch.Generator | None]:
    """A dataset key -> (index, the sample's own RNG or None).

    SeededSampler sends (index, seed): the sample's randomness then depends on neither the worker that loads it nor
    how long that worker has lived. A plain index falls back to torch's global RNG.
    """
    if isinstance(key, tuple):
        index, seed = key
        return index, torch.Generator().manual_seed(seed)
    return key, None


class ImageCaptionDataset(Dataset):
    """Image-caption samples from a list of CaptionedImage.

    Args:
        images: the split's images.
        transform: array (H, W, 3) uint8 -> tensor (3, H, W).
        captions: "one": each image once per epoch with a caption drawn at random (no duplicate photo in a batch,
            so no false negatives in the contrastive loss); "all": every (image, caption) pair (liteCLIP);
            "first": each image once with its first caption (evaluation, deterministic).
        decode_size: the smallest side the transform needs, for JPEG draft decoding.
        skip_undecodable: a sample whose image does not decode is replaced by the next one (deterministically, so
            resume stays exact, and the batch keeps its size) and reported in the sample's "skipped" list; off, it
            raises UndecodableImageError naming the file.
        keep_decoded: each image stays in memory once decoded, for the epochs after (data.keep_decoded_images).
    """

    def __init__(self, images: list[CaptionedImage], transform: Callable[[np.ndarray], torch.Tensor],
                 captions: Literal["one", "all", "first"] = "one", decode_size: int | None = None,
                 skip_undecodable: bool = False, keep_decoded: bool = False):
        self.images = images
        self.transform = transform
        self.captions = captions
        self.decode_size = decode_size
        self.skip_undecodable = skip_undecodable
        self.decoded: dict[int, np.ndarray] | None = {} if keep_decoded else None  # image index -> pixels
        self.pairs = [(i, j) for i, image in enumerate(images) for j in range(len(image.captions))]

    def __len__(self) -> int:
        return len(self.pairs) if self.captions == "all" else len(self.images)

    def locate(self, index: int, generator: torch.Generator | None = None) -> tuple[int, int]:
        """(image index, caption index) of sample `index`; draws the caption when captions='one'."""
        if self.captions == "all":
            return self.pairs[index]
        num_captions = len(self.images[index].captions)
        return index, int(torch.randint(num_captions, (), generator=generator)) if self.captions == "one" else 0

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, generator = unpack_sample_key(key)
        skipped: list[tuple[str, str]] = []
        while True:
            image_index, caption_index = self.locate(index, generator)
            image = self.images[image_index]
            try:
                pixels = self.pixels(image_index)
                break
            except UndecodableImageError as error:
                if not self.skip_undecodable or len(skipped) + 1 >= len(self):
                    raise
                skipped.append((str(image.image_path), error.reason))
                index = (index + 1) % len(self)
        transform_seed = int(torch.randint(2**31 - 1, (), generator=generator)) if generator is not None else None
        pixels = self.transform(pixels, transform_seed) if transform_seed is not None else self.transform(pixels)
        sample = {"pixel_values": pixels, "caption": image.captions[caption_index], "image_index": image_index,
                  "caption_index": caption_index}
        if skipped:
            sample["skipped"] = skipped
        return sample

    def pixels(self, image_index: int) -> np.ndarray:
        """The decoded image, from memory when it is kept there (read-only: the transforms make new arrays)."""
        if self.decoded is not None and image_index in self.decoded:
            return self.decoded[image_index]
        pixels = load_image(self.images[image_index].image_path, self.decode_size)
        if self.decoded is not None:
            pixels.setflags(write=False)
            self.decoded[image_index] = pixels
        return pixels


class SeededSampler(Sampler):
    """Yields (index, seed) pairs: the order of an inner sampler, and a seed per sample from (seed, epoch, index),
    unique per sample and epoch on every rank.

    Samplers run in the main process, so set_epoch reaches them even with persistent DataLoader workers.
    """

    def __init__(self, inner: Sampler, seed: int):
        self.inner = inner
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Reorders for `epoch`; the first `skip` samples of its order are left out (a run resumed mid-epoch
        continues where the checkpoint was written, with the same order and the same per-sample seeds)."""
        self.epoch = epoch
        self.skip = skip
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        generator = getattr(self.inner, "generator", None)
        if generator is not None:
            generator.manual_seed(epoch_seed(self.seed, epoch))

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        base = epoch_seed(self.seed, self.epoch) * 10_000_019
        for index in itertools.islice(self.inner, self.skip, None):
            yield index, (base + index) % (2**63 - 1)


class CaptionCollator:
    """Stacks images and tokenises captions, padding only to the longest caption in the batch."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer([s["caption"] for s in samples], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                 "image_index": torch.tensor([s["image_index"] for s in samples])}
        for key in ("pixel_values", "image_features", "teacher_image_embeds", "teacher_text_embeds"):
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])
        if "stream_position" in samples[-1]:
            batch["stream_position"] = samples[-1]["stream_position"]  # (reader, shards opened): the latest sample's
        skipped = [entry for s in samples for entry in s.get("skipped", ())]
        if skipped:
            batch["skipped"] = skipped  # (path, reason) of images replaced in this batch
        return batch


class SkippedImages:
    """Training images that did not decode: each logged once, with its reason, and counted."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def add(self, entries: Iterable[tuple[str, str]]) -> None:
        for path, reason in entries:
            if path not in self.reasons:
                self.reasons[path] = reason
                logger.warning("skipped training image %s (%s); the next image takes its place. "
                               "`python -m liteclip.data check` lists every such file", path, reason)

    def __len__(self) -> int:
        return len(self.reasons)

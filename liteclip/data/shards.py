"""Webdataset shards: training from a stream of tar files, and writing shards from any dataset liteclip reads.

A shard is a tar file of samples in the layout img2dataset writes and open_clip trains from: files sharing a key
form one sample, an image (`KEY.jpg`, `.jpeg`, `.png` or `.webp`) and its captions: a `KEY.json` "captions" list,
else the lines of `KEY.txt`, else a json "caption" string; one of them is drawn each time the sample is read. The
webdataset library expands the brace patterns, opens the URLs (local paths, http(s), `pipe:` commands), reads the
tars and shuffles; this module decides which reader reads which shard and how an epoch ends.
`python -m liteclip.data check 'PATTERN'` lists every sample training would skip, before a run does.

How an epoch streams. Every epoch shuffles the shard list with (seed, epoch); with R ranks and W DataLoader workers
there are R*W readers, and reader r takes every (R*W)-th shard from position r, which is webdataset's split_by_node
followed by split_by_worker: each shard is read by one reader. A reader streams its shards through a shuffle buffer
and stops at its quota, so every rank yields exactly data.epoch_samples / (R * batch_size) batches (DDP needs equal
step counts); a reader that runs out of shards before its quota starts another pass over them, in a new order.

Resume. The last sample of each batch carries its reader's position: the first shard not yet wholly out of the
shuffle buffer, and which samples of that shard and the later open ones have been yielded; checkpoints keep every
reader's latest. A run resumed inside an epoch makes exactly the batches the epoch has left; each reader skips the
shards it had finished without opening them, reopens the few still in its buffer (at most shuffle_buffer samples'
worth) and leaves out the samples of those it had already yielded. Exact: the step count, and the set of samples the
epoch trains on (none twice, none missing). Not exact: their order and augmentations after the resume, which differ
from an uninterrupted run's. Resuming with other data.num_workers or world size keeps the step count, and readers
without a recorded position start their shards anew.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm

from liteclip.files import atomic_write_bytes, file_stamp
from liteclip.data.captions import BadRow, CaptionedImage
from liteclip.data.images import UndecodableImageError, open_rgb
from liteclip.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def webdataset() -> Any:
    """The webdataset module, or an error saying how to install it."""
    try:
        import webdataset
    except ImportError:
        raise DataError("reading or writing shards needs the webdataset library: pip install 'liteclip[shards]' "
                        "(or pip install webdataset)") from None
    return webdataset


def expand_shards(pattern: str, key: str = "data.shards") -> list[str]:
    """The shard URLs of a brace pattern ("a-{000..009}.tar", several joined by "::"); local files must exist."""
    urls = list(webdataset().shardlists.expand_urls(pattern))
    if not urls:
        raise ConfigError(f"{key}={pattern!r} names no shards")
    missing = [url for url in urls if is_local(url) and not Path(url).is_file()]
    if missing:
        raise DataError(f"{key}: {len(missing)} of {len(urls)} shards do not exist, first {missing[0]}; "
                        f"`python -m liteclip.data shard SRC DST` writes shards and prints their pattern")
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


# ------------------------------------------------------------------------------------------------ one sample


def metadata_of(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's json as a dict ({} when it has none, or one that is not a JSON object)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def all_captions(sample: dict[str, Any]) -> list[str]:
    """Every caption of a sample: a json "captions" list, else the txt file's lines, else json "caption"."""
    meta = metadata_of(sample)
    captions = [c.strip() for c in meta.get("captions", ()) if isinstance(c, str) and c.strip()]
    if not captions and "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace")
        captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions and isinstance(meta.get("caption"), str) and meta["caption"].strip():
        captions = [meta["caption"].strip()]
    return captions


def image_of(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    """(extension, encoded bytes) of the sample's image, or None."""
    for key in IMAGE_KEYS:
        if key in sample:
            return key, sample[key]
    return None


def sample_name(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def usable_parts(sample: dict[str, Any]) -> tuple[tuple[str, bytes], list[str]] | str:
    """(image_of, all_captions) of a sample that can train, or why it cannot: no image, or no caption."""
    image = image_of(sample)
    if image is None:
        return f"no image ({', '.join(IMAGE_KEYS)}) in the sample"
    captions = all_captions(sample)
    if not captions:
        return "no caption (a txt file, or json 'caption' / 'captions')"
    return image, captions


# ---------------------------------------------------------------------------------------------------- stream


class ReaderPosition:
    """Where one reader stands in its epoch, by shard ordinal (counted over passes): every shard below done_below
    has had all its samples leave the shuffle buffer; of the shards from there on, `emitted` holds the positions
    (in the tar) of the samples already yielded. A resumed reader starts at done_below and skips those."""

    def __init__(self, snapshot: dict[str, Any]):
        self.done_below = snapshot.get("next", 0)
        self.emitted = {int(shard): set(positions) for shard, positions in snapshot.get("emitted", {}).items()}
        self.in_buffer: dict[int, int] = {}  # shard -> samples read from it and still in the shuffle buffer
        self.reading: int | None = None  # the shard being read
        self.opened = self.done_below  # shards opened so far

    def unread(self, ordinal: int, tar: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The samples of shard `ordinal` not yielded before, tagged with where they come from."""
        self.reading, self.opened = ordinal, ordinal + 1
        for index, sample in enumerate(tar):
            if index not in self.emitted.get(ordinal, ()):
                sample["__shard__"], sample["__position__"] = ordinal, index
                self.in_buffer[ordinal] = self.in_buffer.get(ordinal, 0) + 1
                yield sample
        self.reading = None

    def left_buffer(self, sample: dict[str, Any]) -> None:
        shard = sample["__shard__"]
        self.in_buffer[shard] -= 1
        self.emitted.setdefault(shard, set()).add(sample["__position__"])
        while (self.done_below < self.opened and self.done_below != self.reading
               and not self.in_buffer.get(self.done_below)):  # all of this shard's samples are out
            self.emitted.pop(self.done_below, None)
            self.in_buffer.pop(self.done_below, None)
            self.done_below += 1

    def snapshot(self) -> dict[str, Any]:
        return {"next": self.done_below, "emitted": {str(shard): sorted(positions)
                                                     for shard, positions in self.emitted.items()}}


class ShardStream(IterableDataset):
    """Training samples streamed from webdataset shards, in the sample contract of ImageCaptionDataset.

    Args:
        urls: the shard URLs.
        epoch_samples: samples in one epoch over all ranks; each rank yields epoch_samples // (world_size *
            batch_size) batches.
        batch_size: the DataLoader's batch size (a rank's quota is whole batches).
        transform: array (H, W, 3) uint8, seed -> tensor (3, H, W).
        decode_size: the smallest side the transform needs, for JPEG draft decoding.
        shuffle_buffer: samples each reader shuffles among.
        seed, rank, world_size: the run's seed and this process's place in it.

    Bad samples (no image, no caption, an image that does not decode, a damaged tar member) are left out and
    reported in the reader's next good sample's "skipped" list, as ImageCaptionDataset reports undecodable images
    (bad samples after a reader's last sample of an epoch are reported in the epoch that reads them next).
    """

    def __init__(self, urls: Sequence[str], epoch_samples: int, batch_size: int,
                 transform: Callable[..., torch.Tensor], decode_size: int | None = None, shuffle_buffer: int = 1000,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.urls = list(urls)
        self.batch_size = batch_size
        self.batches_per_rank = epoch_samples // (world_size * batch_size)
        if self.batches_per_rank == 0:
            raise ConfigError(f"data.epoch_samples={epoch_samples} is less than one batch per rank "
                              f"(data.batch_size={batch_size} x {world_size} process(es))")
        self.transform, self.decode_size, self.shuffle_buffer = transform, decode_size, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.consumed_batches = 0, 0
        self.resume_shards: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size  # this rank's samples in one epoch

    def set_epoch(self, epoch: int, consumed_batches: int = 0,
                  resume_shards: dict[str, dict[str, Any]] | None = None) -> None:
        """Streams `epoch`; a run resumed inside it passes the batches already trained on and each reader's
        position (TrainState.stream_shards). Takes effect at the next iter() of a non-persistent DataLoader."""
        self.epoch, self.consumed_batches = epoch, consumed_batches
        self.resume_shards = dict(resume_shards or {})

    def reader_shards(self, worker: int, num_workers: int) -> list[str]:
        """The shards one reader streams this epoch: the epoch's shard order, split by rank and then by worker."""
        readers = self.world_size * num_workers
        if len(self.urls) < readers:
            raise DataError(f"{len(self.urls)} shard(s) for {readers} readers ({self.world_size} process(es) x "
                            f"{num_workers} data.num_workers): every reader needs a shard of its own. Write more, "
                            f"smaller shards (`python -m liteclip.data shard --shard-size`) or lower data.num_workers")
        order = random.Random(f"{self.seed}/{self.epoch}").sample(self.urls, len(self.urls))
        return order[self.rank * num_workers + worker::readers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = f"{self.rank}:{worker}"
        # the DataLoader takes batches from its workers in turn: worker w makes batches w, w + W, ... of the epoch
        remaining = (len(range(worker, self.batches_per_rank, num_workers))
                     - len(range(worker, self.consumed_batches, num_workers)))
        samples = self.reader_samples(self.reader_shards(worker, num_workers), reader,
                                      self.resume_shards.get(reader, {}))
        return itertools.islice(samples, max(remaining, 0) * self.batch_size)

    def reader_samples(self, shards: list[str], reader: str, resume: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """One reader's endless stream of decoded samples, pass after pass over its shards; each pass is shuffled
        on its own, so it yields each of its samples once. `resume`: a ReaderPosition.snapshot() from a checkpoint.
        The last sample of each batch carries the position after it, as ("rank:worker", snapshot)."""
        wds = webdataset()
        rng = random.Random(f"{self.seed}/{self.epoch}/{reader}/{json.dumps(resume, sort_keys=True)}")
        position = ReaderPosition(resume)
        skipped: list[tuple[str, str]] = []

        def keep_going(error: Exception) -> bool:  # a damaged tar member or an unreadable shard: report, go on
            skipped.append((str(error.args[-1]) if error.args else "?", f"unreadable shard data ({error})"))
            return True

        def read(ordinals: range, order: list[str]) -> Iterator[dict[str, Any]]:
            for ordinal in ordinals:
                tar = wds.tarfile_samples([{"url": order[ordinal % len(order)]}], handler=keep_going)
                yield from position.unread(ordinal, tar)

        produced = 0
        for pass_index in itertools.count(position.done_below // len(shards)):
            order = shards if pass_index == 0 else random.Random(
                f"{self.seed}/{self.epoch}/{reader}/pass{pass_index}").sample(shards, len(shards))
            ordinals = range(max(position.done_below, pass_index * len(shards)), (pass_index + 1) * len(shards))
            good = 0
            for sample in wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(read(ordinals, order)):
                position.left_buffer(sample)
                decoded = self.decode(sample, rng)
                if isinstance(decoded, str):
                    skipped.append((sample_name(sample), decoded))
                    continue
                good += 1
                produced += 1
                if skipped:
                    decoded["skipped"], skipped = skipped, []
                if produced % self.batch_size == 0:
                    decoded["stream_position"] = (reader, position.snapshot())
                yield decoded
            if good == 0 and len(ordinals) == len(shards):
                raise DataError(f"reader {reader} read a whole pass over its {len(shards)} shard(s) without one "
                                f"usable sample (first: {shards[0]}); check them with `tar -tf`")

    def decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any] | str:
        """The sample contract of one tar sample, or the reason it cannot be used."""
        parts = usable_parts(sample)
        if isinstance(parts, str):
            return parts
        (_, image), captions = parts
        caption = captions[rng.randrange(len(captions))]
        try:
            pixels = np.asarray(open_rgb(io.BytesIO(image), self.decode_size, sample_name(sample)))
        except UndecodableImageError as error:
            return error.reason
        return {"pixel_values": self.transform(pixels, rng.randrange(2**31 - 1)), "caption": caption,
                "image_index": -1, "caption_index": -1}


# ---------------------------------------------------------------------------------------------------- checking


def check_shards(pattern: str, show_progress: bool = True) -> list[BadRow]:
    """Every sample of the shards that training would skip (no image, no caption, an image that does not decode),
    every damaged tar member and every shard without a sample, each named by shard and sample key."""
    wds = webdataset()
    bad: list[BadRow] = []
    for url in tqdm(expand_shards(pattern, "the shard pattern"), desc="reading shards", unit="shard",
                    disable=not show_progress):
        shard = Path(url) if is_local(url) else url

        def keep_going(error: Exception, shard: Path | str = shard) -> bool:  # report, read on
            bad.append(BadRow(shard, 0, f"unreadable shard data ({error})"))
            return True

        samples = 0
        for sample in wds.tarfile_samples([{"url": url}], handler=keep_going):
            samples += 1
            parts = usable_parts(sample)
            reason = parts if isinstance(parts, str) else None
            if reason is None:
                (_, image), _ = parts
                try:
                    open_rgb(io.BytesIO(image), None, sample_name(sample))
                except UndecodableImageError as error:
                    reason = f"image does not decode: {error.reason}"
            if reason is not None:
                bad.append(BadRow(shard, 0, f"sample {sample.get('__key__', '?')}: {reason}"))
        if samples == 0:
            bad.append(BadRow(shard, 0, "no samples in the shard"))
    return bad


# ------------------------------------------------------------------------------------- evaluation from shards


def extract_shards(pattern: str, cache_root: Path, key: str) -> list[CaptionedImage]:
    """The images and captions of (small) evaluation shards, unpacked once into cache_root: evaluation reads its
    images every epoch, by path, like any other split. Re-extracted when a local shard's size or mtime changes."""
    urls = expand_shards(pattern, key)
    stamps = [[url, *(file_stamp(url) if is_local(url) else ())] for url in urls]
    directory = cache_root / f"shards_{hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]}"
    listing = directory / "captions.json"
    if listing.is_file():
        return [CaptionedImage(directory / name, captions) for name, captions in json.loads(listing.read_text())]
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for sample in webdataset().tarfile_samples([{"url": url} for url in urls]):
        parts = usable_parts(sample)
        if isinstance(parts, str):
            logger.warning("%s: left out of %s (%s)", sample_name(sample), key, parts)
            continue
        (extension, image), captions = parts
        name = f"{len(entries):08d}.{extension}"
        (directory / name).write_bytes(image)
        entries.append((name, captions))
    atomic_write_bytes(listing, json.dumps(entries).encode())  # last: its presence means the extraction finished
    logger.info("%s: %d images from %d shard(s) unpacked into %s", key, len(entries), len(urls), directory)
    return [CaptionedImage(directory / name, captions) for name, captions in entries]


# ---------------------------------------------------------------------------------------------------- writing


def write_shards(images: Sequence[CaptionedImage], destination: Path, prefix: str, shard_size: int,
                 seed: int | None = 0) -> tuple[str, int]:
    """Writes images with their captions as shards DESTINATION/PREFIX-000000.tar, ... of shard_size samples.

    Each sample keeps its image file's bytes (`.jpg`, `.png` or `.webp`, as the file was) with the first caption as
    `.txt` and every caption as `.json` "captions". The images are shuffled with `seed` first (None keeps their
    order), so a shard is a random draw rather than a run of similar files. Each shard is written under a temporary
    name and renamed when complete; shards left from an earlier, longer run under the same prefix are removed.

    Returns:
        (the shards' brace pattern, samples written).
    """
    wds = webdataset()
    destination.mkdir(parents=True, exist_ok=True)
    order = list(images)
    if seed is not None:
        random.Random(seed).shuffle(order)
    names = []
    for first in range(0, len(order), shard_size):
        name = destination / f"{prefix}-{len(names):06d}.tar"
        partial = name.with_name(f".{name.name}.partial")
        # whole-second mtimes: a fractional one makes tarfile add a PAX header to every member, which readers parse
        with wds.TarWriter(str(partial), mtime=int(time.time())) as writer:
            for index, image in enumerate(order[first:first + shard_size], start=first):
                extension = image.image_path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
                if extension not in IMAGE_KEYS:
                    raise DataError(f"{image.image_path}: shards hold jpg, png or webp images; convert the dataset "
                                    f"first (`python -m liteclip.data prepare` writes JPEGs)")
                writer.write({"__key__": f"{index:09d}", extension: image.image_path.read_bytes(),
                              "txt": image.captions[0],
                              "json": json.dumps({"captions": image.captions, "source": image.image_path.name})})
        os.replace(partial, name)
        names.append(name)
    for stale in destination.glob(f"{prefix}-*.tar"):
        if stale not in names:
            stale.unlink()
    pattern = f"{destination}/{prefix}-{{000000..{len(names) - 1:06d}}}.tar" if len(names) > 1 else str(names[0])
    return pattern, len(order)

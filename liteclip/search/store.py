"""A search index on disk: the embeddings of indexed images, the chunks written while indexing, and the optional
FAISS copy that lets `liteclip search` leave the vectors on disk.

    photos.index            safetensors: "embeddings" (N, D) float32, one row per distinct content; metadata
                            "liteclip_index": the model's fingerprint, each row's file (path, (size, mtime) stamp,
                            SHA-256 of its bytes, and the paths of identical copies), and the FAISS file's stamp
    photos.index.faiss      the same vectors in a faiss.IndexFlatIP, written when faiss-cpu is installed; searched
                            memory-mapped, so an index larger than memory costs page cache, not resident memory.
                            Flat inner-product search is exact: its results are the exact search's.
    .photos.index.partial/  chunk-000000.safetensors, ...: what a running `liteclip index` has encoded so far, one
                            chunk of images at a time; a crashed run's chunks are reused by the next and removed
                            once the index is written
    .photos.index.thumbs/   the thumbnails `liteclip serve` shows, one per indexed content

This module is file I/O only; liteclip.search.image_search.ImageSearch decides what to encode and ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from liteclip.files import atomic_write_bytes, file_stamp, read_safetensors
from liteclip.data.image_folder import DERIVED_MARKER  # in every folder of pictures liteclip makes
from liteclip.errors import ModelLoadError

logger = logging.getLogger(__name__)

WHAT = "a search index: delete it and run `liteclip index` again"


class IndexedFile(NamedTuple):
    stamp: list  # [size, mtime_ns]: unchanged means the content hash still holds, without reading the file
    embedding: torch.Tensor
    sha256: str | None  # of the file's bytes; None in indexes written before content hashing


Entries = dict[str, IndexedFile]  # file key (resolved path) -> what was indexed for it


def read_index(path: Path, embeddings: bool = True) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The index's metadata, and its (N, D) embeddings unless `embeddings` is off (they stay on disk)."""
    tensors, metadata = read_safetensors(path, WHAT, names=None if embeddings else ())
    if "liteclip_index" not in metadata or (embeddings and "embeddings" not in tensors):
        raise ModelLoadError(f"{path} is not a liteclip search index; delete it and run `liteclip index` again")
    return json.loads(metadata["liteclip_index"]), tensors.get("embeddings")


def write_index(path: Path, embeddings: torch.Tensor, meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    tensors, metadata = {"embeddings": embeddings.contiguous()}, {"liteclip_index": json.dumps(meta)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def entries_of(meta: dict[str, Any], embeddings: torch.Tensor) -> Entries:
    """Every indexed file, identical copies (a row's `duplicates`) included, with its row's embedding."""
    entries = {}
    for row, entry in enumerate(meta["files"]):
        for file in [entry, *entry.get("duplicates", [])]:
            entries[file["path"]] = IndexedFile(file["stamp"], embeddings[row], entry.get("sha256"))
    return entries


def thumbnails_folder(index_path: Path) -> Path:
    """Where `liteclip serve` keeps the thumbnails of an index's images."""
    return index_path.with_name(f".{index_path.name}.thumbs")


def derived_folders(index_path: Path) -> list[Path]:
    """The folders liteclip keeps beside an index: never indexed as photos, even when the index lies in the folder
    (those of any other index are known by the marker inside them)."""
    return [PartialIndex(index_path).directory, thumbnails_folder(index_path)]


def make_derived_folder(folder: Path) -> bool:
    """Creates a folder liteclip fills itself, marked so that indexing any folder above it leaves it out; False
    (and nothing made) when the name is taken by a link or a file, which liteclip then neither writes through nor
    reads from."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    try:  # O_NOFOLLOW | O_EXCL: a link planted under the marker's name is never written through
        handle = os.open(folder / DERIVED_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return True
    with os.fdopen(handle, "w") as marker:
        marker.write("made by liteclip: thumbnails or index chunks, never indexed as photos\n")
    return True


class PartialIndex:
    """The chunks a running `liteclip index` has written: each one a small index of the images it encoded."""

    def __init__(self, index_path: Path):
        self.directory = index_path.with_name(f".{index_path.name}.partial")

    def entries(self, fingerprint: str) -> Entries:
        """What earlier chunks (of a crashed or stopped run) hold, if the same model wrote them."""
        found: Entries = {}
        for chunk in sorted(self.directory.glob("chunk-*.safetensors")):
            meta, embeddings = read_index(chunk)
            if meta.get("model") == fingerprint:
                found.update(entries_of(meta, embeddings))
        if found:
            logger.info("reusing %d embeddings from an unfinished run in %s", len(found), self.directory)
        return found

    def append(self, fingerprint: str, entries: Entries) -> None:
        if not entries or not make_derived_folder(self.directory):  # no chunks where a link or a file stands
            return
        number = len(list(self.directory.glob("chunk-*.safetensors")))
        meta = {"model": fingerprint, "files": [{"path": key, "stamp": entry.stamp, "sha256": entry.sha256}
                                                for key, entry in entries.items()]}
        write_index(self.directory / f"chunk-{number:06d}.safetensors",
                    torch.stack([entry.embedding for entry in entries.values()]), meta)

    def remove(self) -> None:
        """Deletes the chunks (what append wrote) and the folder once empty; anything else put there stays."""
        for chunk in [*self.directory.glob("chunk-*.safetensors"), self.directory / DERIVED_MARKER]:
            chunk.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()


# ------------------------------------------------------------------------------------------------------ FAISS


def faiss_module() -> Any | None:
    """faiss, when faiss-cpu is installed (pip install 'liteclip[search]'); None otherwise."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_path(index_path: Path) -> Path:
    return index_path.with_name(f"{index_path.name}.faiss")


def write_faiss(index_path: Path, embeddings: torch.Tensor) -> list[int]:
    """Writes the embeddings as a flat inner-product FAISS index beside the index; returns the file's stamp."""
    faiss = faiss_module()
    flat = faiss.IndexFlatIP(embeddings.shape[1])
    flat.add(embeddings.float().contiguous().numpy())
    path = faiss_path(index_path)
    partial = path.with_name(f".{path.name}.tmp")
    faiss.write_index(flat, str(partial))
    os.replace(partial, path)
    return file_stamp(path)


def open_faiss(index_path: Path, meta: dict[str, Any]) -> Any | None:
    """The index's FAISS copy, memory-mapped, if faiss is installed and the file is the one the index recorded."""
    faiss, path = faiss_module(), faiss_path(index_path)
    if faiss is None or "faiss" not in meta or not path.is_file() or file_stamp(path) != meta["faiss"]:
        return None
    flags = getattr(faiss, "IO_FLAG_MMAP_IFC", 0)  # the vectors stay in the file, paged in as searched
    return faiss.read_index(str(path), flags)

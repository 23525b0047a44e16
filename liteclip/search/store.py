"""A search index on disk: one SQLite file that grows chunk by chunk, with no size ceiling.

    photos.index            SQLite (Python's own sqlite3), three tables:
                              meta        format, the model's fingerprint, the embedding width
                              chunks      the rows one indexing step added, stored by column: each content's
                                          SHA-256 (32 bytes a row), its file's path (NUL-separated, as the OS spells
                                          it), [size, mtime_ns] stamps (int64) and embeddings (float32, last, so a
                                          read of the rest never touches them)
                              duplicates  the other files with a row's content: path, SHA-256, stamp
    .photos.index.building  the same, while an index of another model (or of the older format) is rebuilt: renamed
                            over photos.index in one step once whole, so the old index serves until then
    .photos.index.thumbs/   the thumbnails `liteclip serve` shows, one per indexed content

Every change is one SQLite transaction: an indexing step appends one chunk, the end of a run rewrites only the chunks
whose rows changed and the duplicates. A crash keeps the last committed state, so a stopped run loses at most the
chunk it was encoding. Loading reads a few hundred large rows instead of parsing one JSON header.

Indexes written before this format (safetensors with a JSON header, which safetensors caps at 100 MB, about half a
million photos) still load; `liteclip index` rebuilds them in this format, reusing every embedding.

This module is file I/O only; liteclip.search.image_search.ImageSearch decides what to encode and ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from liteclip.data.image_folder import DERIVED_MARKER  # in every folder of pictures liteclip makes
from liteclip.errors import InputError, ModelLoadError
from liteclip.files import _fsync_directory, file_stamp, ordinary_mode, read_safetensors

logger = logging.getLogger(__name__)

FORMAT = "liteclip search index 2"
SQLITE_MAGIC = b"SQLite format 3\x00"
WHAT = "a search index: delete it and run `liteclip index` again"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks (chunk INTEGER PRIMARY KEY, count INTEGER NOT NULL, sha256 BLOB NOT NULL, paths BLOB NOT NULL,
                     stamps BLOB NOT NULL, embeddings BLOB NOT NULL);
CREATE TABLE duplicates (path BLOB PRIMARY KEY, sha256 BLOB NOT NULL, size INTEGER, mtime_ns INTEGER);
"""


class Chunk(NamedTuple):
    """Rows of the index, by column: one per distinct content."""
    sha256: list[str]  # hex
    paths: list[str]  # the file that stands for the content
    stamps: np.ndarray  # (n, 2) int64: [size, mtime_ns] of that file when indexed
    embeddings: np.ndarray | None  # (n, D) float32; None when not read


def pack_paths(paths: list[str]) -> bytes:
    # a path never holds NUL; fsencode keeps names that are not UTF-8 byte for byte
    return b"\0".join(os.fsencode(path) for path in paths)


def unpack_paths(blob: bytes, count: int) -> list[str]:
    paths = [os.fsdecode(path) for path in blob.split(b"\0")] if count else []
    if len(paths) != count:
        raise ValueError(f"{len(paths)} paths for {count} rows")
    return paths


def is_sqlite(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as file:
        return file.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    return False


class IndexFile:
    """An open index file: chunks appended one transaction each, read back chunk by chunk."""

    def __init__(self, path: Path, connection: sqlite3.Connection, fingerprint: str, dim: int):
        self.path, self.connection, self.fingerprint, self.dim = path, connection, fingerprint, dim

    @classmethod
    def create(cls, path: Path, fingerprint: str, dim: int) -> "IndexFile":
        """A new, empty index at `path`, which must not exist."""
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, ordinary_mode())
        os.close(handle)  # made here, with an ordinary mode and never through a link; SQLite fills it
        connection = connect(path)
        with connection:
            connection.executescript(SCHEMA)
            connection.executemany("INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), ("model", fingerprint),
                                                                     ("dim", str(dim))])
        return cls(path, connection, fingerprint, dim)

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> "IndexFile":
        """An index this module wrote; anything else is a ModelLoadError naming the file."""
        if not is_sqlite(path):
            raise ModelLoadError(f"{path} is not a liteclip search index; delete it and run `liteclip index` again")
        try:
            connection = connect(path, writable)
            meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            return cls(path, connection, meta["model"], int(meta["dim"]))
        except (sqlite3.Error, ValueError, KeyError) as error:
            with contextlib.suppress(UnboundLocalError):
                connection.close()
            raise ModelLoadError(f"{path} is damaged or is not a liteclip search index ({error}); delete it and run "
                                 f"`liteclip index` again") from None

    def close(self) -> None:
        self.connection.close()

    def append(self, sha256: list[str], paths: list[str], stamps: np.ndarray, embeddings: np.ndarray) -> None:
        """Adds rows as one chunk, in one transaction."""
        if not sha256:
            return
        with self.connection:
            self.connection.execute(
                "INSERT INTO chunks (count, sha256, paths, stamps, embeddings) VALUES (?, ?, ?, ?, ?)",
                (len(sha256), b"".join(bytes.fromhex(sha) for sha in sha256), pack_paths(paths),
                 np.ascontiguousarray(stamps, dtype="<i8").tobytes(),
                 np.ascontiguousarray(embeddings, dtype="<f4").tobytes()))

    def chunks(self, embeddings: bool = True) -> Iterator[tuple[int, Chunk]]:
        """Each chunk's number and rows, in the order they were added."""
        columns = "chunk, count, sha256, paths, stamps" + (", embeddings" if embeddings else "")
        try:
            # chunk numbers first, then one chunk at a time: a million rows never sit in one result set
            numbers = [number for (number,) in self.connection.execute("SELECT chunk FROM chunks ORDER BY chunk")]
            for number in numbers:
                row = self.connection.execute(f"SELECT {columns} FROM chunks WHERE chunk = ?", (number,)).fetchone()
                yield number, self._chunk(row, embeddings)
        except (sqlite3.Error, ValueError, TypeError) as error:
            raise ModelLoadError(f"{self.path} is damaged ({error}); delete it and run `liteclip index` again") \
                from None

    def _chunk(self, row: tuple, embeddings: bool) -> Chunk:
        _, count, sha_blob, path_blob, stamp_blob = row[:5]
        if len(sha_blob) != 32 * count or len(stamp_blob) != 16 * count:
            raise ValueError(f"a chunk of {count} rows has {len(sha_blob)} bytes of hashes")
        vectors = None
        if embeddings:
            vectors = np.frombuffer(row[5], dtype="<f4")
            if vectors.size != count * self.dim:
                raise ValueError(f"a chunk of {count} rows has {vectors.size} numbers, not {count} x {self.dim}")
            vectors = vectors.reshape(count, self.dim)
        return Chunk([sha_blob[32 * i:32 * i + 32].hex() for i in range(count)], unpack_paths(path_blob, count),
                     np.frombuffer(stamp_blob, dtype="<i8").reshape(count, 2), vectors)

    def row_count(self) -> int:
        try:
            return int(self.connection.execute("SELECT COALESCE(SUM(count), 0) FROM chunks").fetchone()[0])
        except sqlite3.Error as error:
            raise ModelLoadError(f"{self.path} is damaged ({error}); delete it and run `liteclip index` again") \
                from None

    def duplicates(self) -> list[tuple[str, str, list[int]]]:
        """(path, sha256, stamp) of every file whose content another row stands for."""
        try:
            rows = self.connection.execute("SELECT path, sha256, size, mtime_ns FROM duplicates").fetchall()
            return [(os.fsdecode(path), sha.hex(), [size, mtime]) for path, sha, size, mtime in rows]
        except sqlite3.Error as error:
            raise ModelLoadError(f"{self.path} is damaged ({error}); delete it and run `liteclip index` again") \
                from None

    def finish(self, live: dict[str, tuple[str, list[int]]], duplicates: list[tuple[str, str, list[int]]]) -> None:
        """Makes the index hold exactly `live` (content -> the file standing for it and its stamp) and `duplicates`,
        in one transaction: only chunks with a row gone or changed are rewritten."""
        seen: set[str] = set()
        with self.connection:
            for number, chunk in list(self.chunks(embeddings=False)):
                keep = []
                for i, sha in enumerate(chunk.sha256):
                    if sha in live and sha not in seen:
                        keep.append(i)
                        seen.add(sha)
                current = [(chunk.paths[i], chunk.stamps[i].tolist()) for i in keep]
                if len(keep) == len(chunk.sha256) and current == [list(live[chunk.sha256[i]]) for i in keep]:
                    continue
                if not keep:
                    self.connection.execute("DELETE FROM chunks WHERE chunk = ?", (number,))
                    continue
                blob = self.connection.execute("SELECT embeddings FROM chunks WHERE chunk = ?", (number,)).fetchone()
                vectors = np.frombuffer(blob[0], dtype="<f4").reshape(-1, self.dim)[keep]
                shas = [chunk.sha256[i] for i in keep]
                self.connection.execute(
                    "UPDATE chunks SET count = ?, sha256 = ?, paths = ?, stamps = ?, embeddings = ? WHERE chunk = ?",
                    (len(keep), b"".join(bytes.fromhex(sha) for sha in shas),
                     pack_paths([live[sha][0] for sha in shas]),
                     np.asarray([live[sha][1] for sha in shas], dtype="<i8").tobytes(),
                     np.ascontiguousarray(vectors).tobytes(), number))
            self.connection.execute("DELETE FROM duplicates")
            self.connection.executemany("INSERT OR REPLACE INTO duplicates VALUES (?, ?, ?, ?)",
                                        [(os.fsencode(path), bytes.fromhex(sha), stamp[0], stamp[1])
                                         for path, sha, stamp in duplicates])


def connect(path: Path, writable: bool = True) -> sqlite3.Connection:
    # check_same_thread off: the page's indexing thread writes while its request threads never touch the file
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode={'rw' if writable else 'ro'}"
    return sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)


def building_path(index_path: Path) -> Path:
    """Where an index is rebuilt (another model's, or the older format) before it replaces the old one."""
    return index_path.with_name(f".{index_path.name}.building")


def replace_with_built(built: IndexFile, index_path: Path) -> None:
    """Puts a rebuilt index in place of the old one in one rename; readers see the old index or the new one."""
    built.close()
    with open(built.path, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(built.path, index_path)
    _fsync_directory(index_path.parent)


# -------------------------------------------------------------------------------------------- the older format


class LegacyIndex(NamedTuple):
    """An index written before this format: one safetensors file, its rows in a JSON header."""
    meta: dict[str, Any]
    embeddings: torch.Tensor | None


def read_legacy(path: Path, embeddings: bool = True) -> LegacyIndex:
    tensors, metadata = read_safetensors(path, WHAT, names=None if embeddings else ())
    if "liteclip_index" not in metadata or (embeddings and "embeddings" not in tensors):
        raise ModelLoadError(f"{path} is not a liteclip search index; delete it and run `liteclip index` again")
    return LegacyIndex(json.loads(metadata["liteclip_index"]), tensors.get("embeddings"))


def legacy_faiss_path(index_path: Path) -> Path:
    """The flat FAISS copy older versions wrote beside an index (the in-memory float16 scan replaced it)."""
    return index_path.with_name(f"{index_path.name}.faiss")


def legacy_chunks_folder(index_path: Path) -> Path:
    """Where older versions kept the chunks of an unfinished run (safetensors files, each a small legacy index)."""
    return index_path.with_name(f".{index_path.name}.partial")


def legacy_chunks(index_path: Path) -> list[LegacyIndex]:
    folder = legacy_chunks_folder(index_path)
    if folder.is_symlink() or not folder.is_dir():
        return []
    chunks = []
    for chunk in sorted(folder.glob("chunk-*.safetensors")):
        try:
            chunks.append(read_legacy(chunk))
        except ModelLoadError as error:  # a chunk cut short by the crash: its images are encoded again
            logger.warning("%s", error)
    return chunks


def remove_legacy_files(index_path: Path, legacy_meta: dict[str, Any] | None) -> None:
    """Deletes what older versions wrote beside an index once it is rebuilt: their chunks and marker (the folder
    only if nothing else is in it), and the FAISS copy if it is still the very file the old index recorded."""
    folder = legacy_chunks_folder(index_path)
    if folder.is_dir() and not folder.is_symlink():
        for chunk in [*folder.glob("chunk-*.safetensors"), folder / DERIVED_MARKER]:
            chunk.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
    faiss_file = legacy_faiss_path(index_path)
    if legacy_meta and "faiss" in legacy_meta and faiss_file.is_file() and not faiss_file.is_symlink():
        with contextlib.suppress(OSError):
            if file_stamp(faiss_file) == legacy_meta["faiss"]:
                faiss_file.unlink()


# ------------------------------------------------------------------------------------------ folders beside it


def thumbnails_folder(index_path: Path) -> Path:
    """Where `liteclip serve` keeps the thumbnails of an index's images."""
    return index_path.with_name(f".{index_path.name}.thumbs")


def derived_folders(index_path: Path) -> list[Path]:
    """The folders liteclip keeps beside an index: never indexed as photos, even when the index lies in the folder
    (those of any other index are known by the marker inside them)."""
    return [legacy_chunks_folder(index_path), thumbnails_folder(index_path)]


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


def check_index_path(index_path: Path) -> None:
    """Refuses an index path liteclip must not write: a folder, or a file of the user's (anything that is not an
    index), which is left as it is."""
    if index_path.exists() and not index_path.is_file():
        raise InputError(f"the index path {index_path} is a folder; give the index a file name of its own, such "
                         f"as photos.index (nothing was written)")

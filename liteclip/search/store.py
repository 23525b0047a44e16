"""A search index on disk: one SQLite file that grows chunk by chunk, with no size ceiling.

    photos.index            SQLite (Python's own sqlite3), three tables:
                              meta        format, the model's fingerprint, the embedding width
                              chunks      the rows one indexing step added, stored by column: each content's
                                          SHA-256 (32 bytes a row), its file's path (NUL-separated, as the OS spells
                                          it), [size, mtime_ns] stamps (int64) and embeddings (float32, last, so a
                                          read of the rest never touches them)
                              duplicates  the other files with a row's content: path, SHA-256, stamp
                              changes     rows removed since, or standing for another file now, by chunk and
                                          position: an update writes what changed, not the chunks around it
    .photos.index.building  the same, while an index of another model (or of the older format) is rebuilt: renamed
                            over photos.index in one step once whole, so the old index serves until then
    .photos.index.thumbs/   the thumbnails `liteclip serve` shows, one per indexed content

Every change is one SQLite transaction: an indexing step appends one chunk, the end of a run records what changed
(the chunks holding the changes are rewritten only once changes pass a quarter of the rows). A crash keeps the last committed state, so a stopped run loses at most the
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
import tempfile
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
CREATE TABLE changes (chunk INTEGER NOT NULL, position INTEGER NOT NULL, path BLOB, size INTEGER, mtime_ns INTEGER,
                      PRIMARY KEY (chunk, position));
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


# what SQLite's own files beside a database begin with: a rollback journal, a write-ahead log (two byte orders),
# and a journal whose header is not written yet (zeros: SQLite finalises it before it changes the database)
SIDECAR_MAGIC = (bytes.fromhex("d9d505f920a163d7"), bytes.fromhex("377f0682"), bytes.fromhex("377f0683"), bytes(8))
DAMAGED = "delete it and run `liteclip index` again"


def damaged(path: Path, error: Exception) -> ModelLoadError:
    """An index file that cannot be read as one, as one line naming it."""
    return ModelLoadError(f"{path} is damaged ({error}); {DAMAGED}")


def check_sidecars(path: Path) -> None:
    """SQLite reads (and then deletes) `PATH-journal` and `PATH-wal` as its own: one that is not SQLite's, a file of
    the user's that happens to have the name, is refused before SQLite can touch it."""
    for suffix in ("-journal", "-wal"):
        sidecar = path.with_name(path.name + suffix)
        if not os.path.lexists(sidecar):
            continue
        head = b""
        if not sidecar.is_symlink() and sidecar.is_file():
            with contextlib.suppress(OSError), open(sidecar, "rb") as file:
                head = file.read(8)
        if sidecar.is_symlink() or not sidecar.is_file() or (head and not head.startswith(SIDECAR_MAGIC)):
            raise InputError(f"{sidecar} is not SQLite's journal of the index {path.name}, and SQLite would take it "
                             f"for one; liteclip leaves it as it is and wrote nothing: move it away, or give --index "
                             f"another name")


def storage_error(path: Path, error: Exception) -> OSError:
    """A write the file system or SQLite refused (a full disk, a read-only file), as one line."""
    return OSError(f"cannot write the search index {path}: {error}; it keeps what was committed before "
                   f"(free some space or make it writable, then run `liteclip index` again to continue)")


class IndexFile:
    """An open index file: chunks appended one transaction each, read back chunk by chunk."""

    def __init__(self, path: Path, connection: sqlite3.Connection, fingerprint: str, dim: int):
        self.path, self.connection, self.fingerprint, self.dim = path, connection, fingerprint, dim
        self.has_changes = True  # False only for a read-only index of the first version, without that table

    @classmethod
    def create(cls, path: Path, fingerprint: str, dim: int) -> "IndexFile":
        """A new index at `path`, made whole beside it and linked into place, so the name never holds a half-made
        file; another process that made it meanwhile is joined if the index is this model's."""
        check_sidecars(path)
        handle, staged = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
        try:
            os.fchmod(handle, ordinary_mode())
            os.close(handle)
            connection = sqlite3.connect(staged)
            try:
                connection.executescript(f"BEGIN; {SCHEMA} COMMIT;")
                with connection:
                    connection.executemany("INSERT INTO meta VALUES (?, ?)",
                                           [("format", FORMAT), ("model", fingerprint), ("dim", str(dim))])
            finally:
                connection.close()
            with open(staged, "rb+") as file:
                os.fsync(file.fileno())
            os.link(staged, path)  # fails if the name is taken: never replaces anything
            _fsync_directory(path.parent)
        except FileExistsError:
            joined = cls.open(path, writable=True)
            if joined.fingerprint != fingerprint or joined.dim != dim:
                joined.close()
                raise InputError(f"{path} was made meanwhile by another model's indexing; run `liteclip index` "
                                 f"again once it is done") from None
            return joined
        except (sqlite3.Error, OSError) as error:
            raise storage_error(path, error) from None
        finally:
            Path(staged).unlink(missing_ok=True)
        return cls.open(path, writable=True)

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> "IndexFile":
        """An index this module wrote; anything else is a ModelLoadError naming the file."""
        if not is_sqlite(path):
            raise ModelLoadError(f"{path} is not a liteclip search index; {DAMAGED}")
        check_sidecars(path)
        connection = None
        try:
            connection = connect(path, writable)
            meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            dim = int(meta["dim"])
            if not 1 <= dim <= 1 << 16 or not isinstance(meta["model"], str):
                raise ValueError(f"an embedding width of {dim}")
            tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"chunks", "duplicates"} <= tables:
                raise ValueError("tables missing")
            if "changes" not in tables and writable:  # an index of the first version of this format
                with connection:
                    connection.execute(SCHEMA[SCHEMA.index("CREATE TABLE changes"):])
            index_file = cls(path, connection, meta["model"], dim)
            index_file.has_changes = "changes" in tables or writable
            return index_file
        except (sqlite3.Error, ValueError, KeyError, TypeError, OverflowError) as error:
            if connection is not None:
                connection.close()
            raise ModelLoadError(f"{path} is damaged or is not a liteclip search index ({error}); {DAMAGED}") \
                from None

    def close(self) -> None:
        self.connection.close()

    def append(self, sha256: list[str], paths: list[str], stamps: np.ndarray, embeddings: np.ndarray) -> None:
        """Adds rows as one chunk, in one transaction."""
        if not sha256:
            return
        try:
            with self.connection:
                self.connection.execute(
                    "INSERT INTO chunks (count, sha256, paths, stamps, embeddings) VALUES (?, ?, ?, ?, ?)",
                    (len(sha256), b"".join(bytes.fromhex(sha) for sha in sha256), pack_paths(paths),
                     np.ascontiguousarray(stamps, dtype="<i8").tobytes(),
                     np.ascontiguousarray(embeddings, dtype="<f4").tobytes()))
        except sqlite3.Error as error:
            raise storage_error(self.path, error) from None

    def chunks(self, embeddings: bool = True, as_written: bool = False) -> Iterator[tuple[int, Chunk]]:
        """Each chunk's number and rows, in the order they were added, with the recorded changes applied (rows
        removed, rows standing for another file now); `as_written`: without them."""
        # without the embeddings, their length still (SQLite keeps it in the row's header: nothing more is read)
        columns = "chunk, count, sha256, paths, stamps, " + ("embeddings" if embeddings else "length(embeddings)")
        try:
            # chunk numbers first, then one chunk at a time: a million rows never sit in one result set
            numbers = [number for (number,) in self.connection.execute("SELECT chunk FROM chunks ORDER BY chunk")]
            for number in numbers:
                row = self.connection.execute(f"SELECT {columns} FROM chunks WHERE chunk = ?", (number,)).fetchone()
                chunk = self._chunk(row, embeddings)
                yield number, chunk if as_written else self._changed(number, chunk)
        except (sqlite3.Error, ValueError, TypeError, IndexError, OverflowError, AttributeError) as error:
            raise damaged(self.path, error) from None

    def _chunk(self, row: tuple, embeddings: bool) -> Chunk:
        _, count, sha_blob, path_blob, stamp_blob, vector_blob = row
        if not isinstance(count, int) or count < 0 or not all(isinstance(blob, bytes) for blob in row[2:5]):
            raise ValueError(f"a chunk with a count of {count!r} or columns that are not bytes")
        if len(sha_blob) != 32 * count or len(stamp_blob) != 16 * count:
            raise ValueError(f"a chunk of {count} rows has {len(sha_blob)} bytes of hashes")
        size = len(vector_blob) if embeddings and isinstance(vector_blob, bytes) else vector_blob
        if size != 4 * count * self.dim:
            raise ValueError(f"a chunk of {count} rows has {size} bytes of embeddings, not {count} x {self.dim} x 4")
        vectors = None
        if embeddings:
            vectors = np.frombuffer(vector_blob, dtype="<f4").reshape(count, self.dim)
            with np.errstate(over="ignore", invalid="ignore"):
                norms = np.linalg.norm(vectors, axis=1)
            if not np.all(np.abs(norms - 1) < 1e-3):  # unit vectors, as encoded: NaN and overwritten bytes fail
                raise ValueError("embeddings that are not unit vectors (NaN, infinity or overwritten bytes)")
        return Chunk([sha_blob[32 * i:32 * i + 32].hex() for i in range(count)], unpack_paths(path_blob, count),
                     np.frombuffer(stamp_blob, dtype="<i8").reshape(count, 2), vectors)

    def _changed(self, number: int, chunk: Chunk) -> Chunk:
        if not self.has_changes:
            return chunk
        changes = self.connection.execute("SELECT position, path, size, mtime_ns FROM changes WHERE chunk = ?",
                                          (number,)).fetchall()
        if not changes:
            return chunk
        if not all(isinstance(position, int) and 0 <= position < len(chunk.paths) for position, *_ in changes):
            raise ValueError(f"a change of chunk {number} names a row it does not have")
        paths, stamps = list(chunk.paths), chunk.stamps.copy()
        removed = set()
        for position, path, size, mtime in changes:
            if path is None:
                removed.add(position)
            else:
                paths[position], stamps[position] = os.fsdecode(path), (size, mtime)
        kept = [i for i in range(len(paths)) if i not in removed]
        return Chunk([chunk.sha256[i] for i in kept], [paths[i] for i in kept], stamps[kept],
                     chunk.embeddings[kept] if chunk.embeddings is not None else None)

    def row_count(self) -> int:
        """How many rows the chunks hold, those removed since included (an upper bound of what loads)."""
        try:
            # from the hashes' length rather than the counts: a damaged count cannot ask for terabytes
            total = self.connection.execute("SELECT COALESCE(SUM(length(sha256)), 0) FROM chunks").fetchone()[0]
            return int(total) // 32
        except (sqlite3.Error, TypeError, ValueError) as error:
            raise damaged(self.path, error) from None

    def duplicates(self) -> list[tuple[str, str, list[int]]]:
        """(path, sha256, stamp) of every file whose content another row stands for."""
        try:
            rows = self.connection.execute("SELECT path, sha256, size, mtime_ns FROM duplicates").fetchall()
            return [(os.fsdecode(path), sha.hex(), [size, mtime]) for path, sha, size, mtime in rows]
        except (sqlite3.Error, AttributeError, TypeError, ValueError) as error:
            raise damaged(self.path, error) from None

    def finish(self, live: dict[str, tuple[str, list[int]]], duplicates: list[tuple[str, str, list[int]]]) -> None:
        """Makes the index hold exactly `live` (content -> the file standing for it and its stamp) and `duplicates`,
        in one transaction. What changed is recorded by position (a row removed, or standing for another file), so
        an update costs what changed; once the changes pass a quarter of the rows, the chunks holding them are
        rewritten without them."""
        seen: set[str] = set()
        changes: dict[int, dict[int, tuple[str, list[int]] | None]] = {}
        total = 0
        for number, chunk in list(self.chunks(embeddings=False, as_written=True)):
            total += len(chunk.sha256)
            for i, (sha, path, stamp) in enumerate(zip(chunk.sha256, chunk.paths, chunk.stamps.tolist())):
                if sha not in live or sha in seen:  # gone, or a second row of one content
                    changes.setdefault(number, {})[i] = None
                    continue
                seen.add(sha)
                if (path, stamp) != (live[sha][0], list(live[sha][1])):
                    changes.setdefault(number, {})[i] = live[sha]
        try:
            self._record(changes, total, duplicates)
        except sqlite3.Error as error:
            raise storage_error(self.path, error) from None
        except ValueError as error:  # a chunk being rewritten turned out damaged: nothing was changed
            raise damaged(self.path, error) from None

    def _record(self, changes: dict[int, dict[int, tuple[str, list[int]] | None]], total: int,
                duplicates: list[tuple[str, str, list[int]]]) -> None:
        with self.connection:
            self.connection.execute("DELETE FROM changes")
            if sum(map(len, changes.values())) > total // 4:
                for number, rows in changes.items():
                    self._rewrite(number, rows)
            else:
                self.connection.executemany(
                    "INSERT INTO changes VALUES (?, ?, ?, ?, ?)",
                    [(number, i, None, None, None) if change is None else
                     (number, i, os.fsencode(change[0]), change[1][0], change[1][1])
                     for number, rows in changes.items() for i, change in rows.items()])
            self.connection.execute("DELETE FROM duplicates")
            self.connection.executemany("INSERT OR REPLACE INTO duplicates VALUES (?, ?, ?, ?)",
                                        [(os.fsencode(path), bytes.fromhex(sha), stamp[0], stamp[1])
                                         for path, sha, stamp in duplicates])

    def _rewrite(self, number: int, rows: dict[int, tuple[str, list[int]] | None]) -> None:
        """Writes a chunk again with its changes in it: removed rows left out, the others' new files recorded."""
        row = self.connection.execute("SELECT chunk, count, sha256, paths, stamps, embeddings FROM chunks "
                                      "WHERE chunk = ?", (number,)).fetchone()
        chunk = self._chunk(row, embeddings=True)
        kept = [i for i in range(len(chunk.sha256)) if rows.get(i, ()) is not None]
        if not kept:
            self.connection.execute("DELETE FROM chunks WHERE chunk = ?", (number,))
            return
        paths = [rows[i][0] if i in rows else chunk.paths[i] for i in kept]
        stamps = [list(rows[i][1]) if i in rows else chunk.stamps[i].tolist() for i in kept]
        self.connection.execute(
            "UPDATE chunks SET count = ?, sha256 = ?, paths = ?, stamps = ?, embeddings = ? WHERE chunk = ?",
            (len(kept), b"".join(bytes.fromhex(chunk.sha256[i]) for i in kept), pack_paths(paths),
             np.asarray(stamps, dtype="<i8").tobytes(), np.ascontiguousarray(chunk.embeddings[kept]).tobytes(),
             number))


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
    """An index of the older format, its rows and embeddings checked (a ModelLoadError naming the file if not)."""
    tensors, metadata = read_safetensors(path, WHAT, names=None if embeddings else ())
    if "liteclip_index" not in metadata or (embeddings and "embeddings" not in tensors):
        raise ModelLoadError(f"{path} is not a liteclip search index; {DAMAGED}")
    try:
        meta = json.loads(metadata["liteclip_index"])
        check_legacy(meta, tensors.get("embeddings"))
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as error:
        raise ModelLoadError(f"{path} is damaged or is not a liteclip search index ({error}); {DAMAGED}") from None
    return LegacyIndex(meta, tensors.get("embeddings"))


def check_legacy(meta: Any, embeddings: torch.Tensor | None) -> None:
    """The older format's rows: {"model": str, "files": [{"path", "stamp": [size, mtime_ns], "sha256"?,
    "duplicates"?: [{"path", "stamp"}]}]}, one unit embedding per row."""
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str) or not isinstance(meta["files"], list):
        raise ValueError("no model and list of files")
    for entry in meta["files"]:
        files = [entry, *entry.get("duplicates", [])] if isinstance(entry, dict) else [entry]
        for file in files:
            stamp = file.get("stamp") if isinstance(file, dict) else None
            if (not isinstance(file, dict) or not isinstance(file.get("path"), str)
                    or not (isinstance(stamp, list) and len(stamp) == 2
                            and all(type(value) is int and 0 <= value < 1 << 63 for value in stamp))):
                raise ValueError(f"a row that is not a path with a [size, mtime_ns] stamp: {str(file)[:80]}")
        sha = entry.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
            raise ValueError(f"a sha256 that is not 64 hex digits: {str(sha)[:80]}")
    if embeddings is not None:
        if (embeddings.ndim != 2 or embeddings.shape[0] != len(meta["files"]) or not embeddings.is_floating_point()
                or not 1 <= embeddings.shape[1] <= 1 << 16):
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} for {len(meta['files'])} rows")
        if not bool(((embeddings.float().norm(dim=1) - 1).abs() < 1e-3).all()):
            raise ValueError("embeddings that are not unit vectors (NaN, infinity or overwritten bytes)")


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
    if folder.is_dir() and not folder.is_symlink() and (folder / DERIVED_MARKER).is_file():
        for chunk in folder.glob("chunk-*.safetensors"):
            with contextlib.suppress(ModelLoadError):  # a file that is not an index chunk is not liteclip's
                read_legacy(chunk, embeddings=False)
                chunk.unlink(missing_ok=True)
        if not any(name.name != DERIVED_MARKER for name in folder.iterdir()):
            (folder / DERIVED_MARKER).unlink(missing_ok=True)
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

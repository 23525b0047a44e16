"""Text-to-image and image-to-image search over an indexed folder: ImageSearch, what `liteclip index`, `search`
and `serve` run.

    search = ImageSearch(ZeroShotPipeline("model"))
    search.index("photos/", "photos.index")     # encodes only what the index does not hold yet
    search.query("2:golden retriever + ./pool.jpg - grass", top_k=5)

An index is keyed by content (SHA-256): a renamed, moved or copied photo is never encoded again, and identical copies
are shown once. The searchable rows only ever grow by appending (Rows), so indexing costs time in proportion to the
photos, and a query reads one whole state of them (SearchView: the first `count` rows, which appending never
changes), so the web page can search while a folder is indexed. The embeddings are searched as float16 (half the
memory, and a scan twice as fast as float32 on a CPU): scores move by about 1e-4, rankings only among near-ties. The
file format is liteclip.search.store's.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from liteclip.data.captions import BadRow
from liteclip.data.image_folder import IMAGE_SUFFIXES, list_images
from liteclip.data.images import unreadable
from liteclip.embedding import encode_decodable_image_files, encode_texts
from liteclip.errors import DataError, InputError, ModelLoadError, NonFiniteError
from liteclip.files import sha256_of
from liteclip.pipeline import ImageInput, ZeroShotPipeline
from liteclip.pretrained import WEIGHTS_NAME
from liteclip.search import store
from liteclip.search.query import QueryTerm, parse_query
from liteclip.search.store import IndexFile, LegacyIndex

logger = logging.getLogger(__name__)

SEARCH_DTYPE = torch.float16


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a saved model's weights: an index built by another model is not reused."""
    return sha256_of(Path(model_dir) / WEIGHTS_NAME)[:16]


# ------------------------------------------------------------------------------------------- what is searched


class Rows:
    """The searchable rows, one per distinct content, append-only: a view reads the first `count`, which appending
    never changes (a full matrix is copied into a larger one, and the old views keep the old one)."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.matrix: torch.Tensor | None = None  # (capacity, D) float16, allocated at the first append
        self.paths: list[str] = []  # the file that stands for each content
        self.sha256: list[str | None] = []  # None: a row of an index written before content hashes
        self.stamps = np.zeros((0, 2), dtype=np.int64)  # [size, mtime_ns] of that file when indexed, as `matrix`
        self._lock = threading.Lock()
        self._lookups: dict[str, dict[str, int]] = {}  # id -> row and path -> row, built when first asked for

    def __len__(self) -> int:
        return len(self.paths)

    def append(self, sha256: Sequence[str | None], paths: Sequence[str], stamps: Any, embeddings: Any) -> None:
        with self._lock:
            start, count = len(self.paths), len(paths)
            if count == 0:
                return
            if not torch.is_tensor(embeddings):  # read-only buffers (a chunk read from the file) are copied once here
                embeddings = torch.from_numpy(np.require(embeddings, dtype=np.float32, requirements="W"))
            if self.matrix is not None and self.matrix.shape[1] != embeddings.shape[1]:
                raise InputError(f"embeddings of width {embeddings.shape[1]} cannot join an index of width "
                                 f"{self.matrix.shape[1]}; run `liteclip index` into a new index")
            if self.matrix is None or start + count > self.matrix.shape[0]:
                self._grow(start + count, embeddings.shape[1])
            self.matrix[start:start + count] = embeddings.to(SEARCH_DTYPE)
            self.stamps[start:start + count] = np.asarray(stamps, dtype=np.int64).reshape(count, 2)
            self.sha256.extend(sha256)
            for name, lookup in self._lookups.items():
                for row in range(start, start + count):
                    lookup[self._key(name, row, paths[row - start])] = row
            self.paths.extend(paths)  # last: its length is the count a view may read

    def _grow(self, needed: int, dim: int) -> None:
        capacity = max(needed, self.capacity, 2 * (self.matrix.shape[0] if self.matrix is not None else 0))
        matrix = torch.empty(capacity, dim, dtype=SEARCH_DTYPE)
        stamps = np.zeros((capacity, 2), dtype=np.int64)
        if self.matrix is not None:
            matrix[:len(self)] = self.matrix[:len(self)]
        stamps[:len(self)] = self.stamps[:len(self)]
        self.matrix, self.stamps, self.capacity = matrix, stamps, capacity

    def _key(self, name: str, row: int, path: str) -> str:
        return self.id(row) if name == "id" else path

    def id(self, row: int) -> str:
        """A stable id: the content hash, shortened (an index without hashes numbers its rows)."""
        sha = self.sha256[row]
        return sha[:16] if sha else str(row)

    def row_of(self, name: str, key: str, count: int) -> int | None:
        """The row with this id (name "id") or path (name "path") among the first `count`, or None."""
        with self._lock:
            if name not in self._lookups:
                self._lookups[name] = {self._key(name, row, path): row for row, path in enumerate(self.paths)}
            row = self._lookups[name].get(key)
        return row if row is not None and row < count else None

    def view(self) -> "SearchView":
        with self._lock:
            count = len(self.paths)
            matrix = self.matrix[:count] if self.matrix is not None else torch.empty(0, 0, dtype=SEARCH_DTYPE)
            return SearchView(self, count, matrix)


class SearchView(NamedTuple):
    """What a search reads, replaced whole (one assignment), so a query running while index() works sees either the
    state before or the state after a chunk, never half of each."""

    rows: Rows
    count: int
    matrix: torch.Tensor  # (count, D) float16

    def path(self, row: int) -> Path:
        return Path(self.rows.paths[row])

    def stamp(self, row: int) -> list[int]:
        return self.rows.stamps[row].tolist()


def view_of_arrays(paths: Sequence[str | Path], embeddings: torch.Tensor) -> SearchView:
    """A view of given rows (no hashes: rows are numbered), for benchmarks and tests that bring their own vectors."""
    rows = Rows(len(paths))
    rows.append([None] * len(paths), [str(path) for path in paths], np.zeros((len(paths), 2)), embeddings)
    return rows.view()


def nearest(view: SearchView, query_embed: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The k rows with the highest cosine similarity (rows and query are unit vectors), best first."""
    scores = (view.matrix @ query_embed.to(view.matrix.dtype)).float()  # (count,); the sums are float32 inside
    values, indices = scores.topk(k)
    return list(zip(indices.tolist(), values.tolist()))


# ------------------------------------------------------------------------------------ what earlier runs hold


class PreviousFile(NamedTuple):
    stamp: list[int]  # [size, mtime_ns]: unchanged means the content hash still holds, without reading the file
    sha256: str | None  # None in indexes written before content hashing
    ref: tuple[int, int]  # (source, row) of its content's embedding


class Previous:
    """What earlier runs of the same model left: every file's stamp and content, and the contents' embeddings,
    read only for the contents still wanted. Sources are index files (this format or the older one)."""

    def __init__(self) -> None:
        self.files: dict[str, PreviousFile] = {}
        self.contents: dict[str, tuple[int, int]] = {}  # sha256 -> (source, row)
        self.sources: list[IndexFile | LegacyIndex] = []

    def add(self, source: IndexFile | LegacyIndex) -> None:
        number = len(self.sources)
        self.sources.append(source)
        if isinstance(source, IndexFile):
            row = 0
            for _, chunk in source.chunks(embeddings=False):
                for sha, path, stamp in zip(chunk.sha256, chunk.paths, chunk.stamps.tolist()):
                    self.contents.setdefault(sha, (number, row))
                    self.files[path] = PreviousFile(stamp, sha, (number, row))
                    row += 1
            for path, sha, stamp in source.duplicates():
                if sha in self.contents:
                    self.files[path] = PreviousFile(stamp, sha, self.contents[sha])
            return
        for row, entry in enumerate(source.meta["files"]):
            sha = entry.get("sha256")
            if sha:
                self.contents.setdefault(sha, (number, row))
            for file in [entry, *entry.get("duplicates", [])]:
                self.files[file["path"]] = PreviousFile(file["stamp"], sha, (number, row))

    def embeddings(self, wanted: dict[tuple[int, int], str]) -> Iterator[tuple[int, list[str], np.ndarray]]:
        """(source, contents, their float32 embeddings) for the wanted (source, row) refs, a chunk at a time."""
        for number, source in enumerate(self.sources):
            mine = {row: sha for (src, row), sha in wanted.items() if src == number}
            if not mine:
                continue
            if isinstance(source, LegacyIndex):
                rows = sorted(mine)
                yield number, [mine[row] for row in rows], source.embeddings[rows].float().numpy()
                continue
            start = 0
            for _, chunk in source.chunks():
                picked = [i for i in range(len(chunk.sha256)) if start + i in mine]
                if picked:
                    yield number, [mine[start + i] for i in picked], chunk.embeddings[picked]
                start += len(chunk.sha256)


def readable_stamps(files: list[Path]) -> tuple[dict[str, Path], dict[str, list[int]], list[BadRow]]:
    """Each file by its key (its resolved path), and its [size, mtime_ns]; a file gone or unreadable since it was
    listed is skipped with the reason, not an error that stops the run."""
    paths, stamps, skipped = {}, {}, []
    real_folders: dict[str, str] = {}  # each folder resolved once, not once per photo in it
    for path in files:
        name = os.fspath(path)
        try:
            status = os.lstat(name)
            if stat.S_ISLNK(status.st_mode):  # a link: filed under the file it leads to
                key, status = os.path.realpath(name), os.stat(name)
            else:
                folder, base = os.path.split(name)
                if folder not in real_folders:
                    real_folders[folder] = os.path.realpath(folder or os.curdir)
                key = os.path.join(real_folders[folder], base)
        except OSError as error:
            skipped.append(BadRow(path, 0, unreadable(path, error).reason))
            continue
        stamps[key] = [status.st_size, status.st_mtime_ns]
        paths[key] = path
    return paths, stamps, skipped


def content_hashes(keys: list[str], stamps: dict[str, list], previous: Previous
                   ) -> tuple[dict[str, str], dict[str, tuple[int, int]], list[BadRow]]:
    """Each file's SHA-256 (read again only when its stamp changed), the contents whose embedding is known (an
    older index without hashes still lends its embeddings to files whose stamp has not changed), and the files that
    could not be read (skipped, with the reason)."""
    hashes, known, skipped = {}, dict(previous.contents), []
    for key in keys:
        entry = previous.files.get(key)
        unchanged = entry is not None and list(entry.stamp) == list(stamps[key])
        try:
            hashes[key] = entry.sha256 if unchanged and entry.sha256 else sha256_of(key)
        except OSError as error:
            skipped.append(BadRow(Path(key), 0, unreadable(Path(key), error).reason))
            continue
        if unchanged:
            known.setdefault(hashes[key], entry.ref)
    return hashes, known, skipped


def first_files(keys: list[str], hashes: dict[str, str]) -> dict[str, str]:
    """Content -> the first of its files in listing order, which stands for it."""
    first: dict[str, str] = {}
    for key in keys:
        first.setdefault(hashes[key], key)
    return first


def unique_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The paths as Path objects, each file once (the first mention of it kept, in order)."""
    paths = [Path(path) for path in paths]
    seen: set[Path] = set()
    unique = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    if len(unique) < len(paths):
        logger.info("%d repeated path(s) indexed once", len(paths) - len(unique))
    return unique


class IndexTarget:
    """The file an index() run writes, and what earlier runs of the same model left:

    - the index itself, when it is this format and this model's: updated in place, a transaction per chunk;
    - otherwise (no index yet, another model's, or the older format) `.NAME.building`, renamed over the index once
      whole, so an index keeps serving until its replacement is complete. An index that does not exist yet is
      written in place too: there is nothing to keep.
    A building file of this model (an interrupted rebuild) is continued; one of another model is started afresh."""

    def __init__(self, index_path: Path, fingerprint: str):
        self.index_path, self.fingerprint = index_path, fingerprint
        self.previous = Previous()
        self.file: IndexFile | None = None  # opened or created when first written
        self.legacy_meta: dict[str, Any] | None = None
        self.replaces: str | None = None  # why the index is rebuilt beside itself, if it is
        self.opened: list[IndexFile] = []  # closed by close(), whatever happens
        store.check_index_path(index_path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(index_path.parent, os.W_OK | os.X_OK):  # found now, not after hours of encoding
            raise InputError(f"cannot write the index {index_path}: its folder is not writable (nothing was encoded)")
        try:
            self._find(index_path, fingerprint)
        except BaseException:
            self.close()
            raise

    def _find(self, index_path: Path, fingerprint: str) -> None:
        building = store.building_path(index_path)
        current = self._open_own(index_path)
        if isinstance(current, IndexFile):
            self.opened.append(current)
        if isinstance(current, IndexFile) and current.fingerprint == fingerprint:
            self.path = index_path
            self.file = current
            self.previous.add(current)
            self._discard(building)
        elif current is None and not building.exists():
            self.path = index_path
        else:
            self.path = building
            if isinstance(current, LegacyIndex):
                self.legacy_meta = current.meta
                self.replaces = "was written by an older liteclip"
                if current.meta.get("model") == fingerprint:
                    self.previous.add(current)
            elif current is not None:
                self.replaces = "was built by another model"
                current.close()
            rebuilding = self._open_own(building)
            if isinstance(rebuilding, IndexFile):
                self.opened.append(rebuilding)
            if isinstance(rebuilding, IndexFile) and rebuilding.fingerprint == fingerprint:
                self.file = rebuilding
                self.previous.add(rebuilding)
            elif isinstance(rebuilding, IndexFile):
                self._discard(building, rebuilding)
            elif rebuilding is not None:  # liteclip never writes the older format there: not its file
                raise InputError(f"{building} exists and is not a liteclip search index, so it is left as it is and "
                                 f"nothing was written; move it away, or give --index another name")
        for chunk in store.legacy_chunks(index_path):  # an interrupted run of an older liteclip
            if chunk.meta.get("model") == fingerprint:
                self.previous.add(chunk)

    def _open_own(self, path: Path) -> IndexFile | LegacyIndex | None:
        """The index at `path` (None if nothing is there); a file of the user's is refused and left as it is."""
        if not path.exists() and not path.is_symlink():
            return None
        try:
            if path.is_symlink():
                raise InputError(f"{path} is a link; liteclip writes an index only at its real path "
                                 f"({os.path.realpath(path)}), never through a link (nothing was written)")
            if not path.is_file():
                raise ModelLoadError(f"{path} is not a file")
            if not store.is_sqlite(path):
                return store.read_legacy(path)
            if not os.access(path, os.W_OK):
                raise InputError(f"{path} is not writable, so it cannot be updated (nothing was written); make it "
                                 f"writable, or give --index another name")
            return IndexFile.open(path, writable=True)
        except ModelLoadError:
            raise InputError(f"{path} exists and is not a liteclip search index, so it is left as it is and nothing "
                             f"was written; give --index another name (or, if it is a damaged index of yours, "
                             f"delete it and index again)") from None

    def _discard(self, building: Path, opened: IndexFile | None = None) -> None:
        """Removes a building file this module wrote (it is only ever an index of this format)."""
        if opened is None and building.exists():
            try:
                opened = self._open_own(building)
            except InputError:  # not liteclip's: left as it is
                return
        if isinstance(opened, IndexFile):
            opened.close()
            building.unlink()

    def append(self, sha256: list[str], paths: list[str], stamps: Any, embeddings: np.ndarray) -> None:
        if not sha256:
            return
        if self.file is None:
            self.file = IndexFile.create(self.path, self.fingerprint, embeddings.shape[1])
        self.file.append(sha256, paths, stamps, embeddings)

    def finish(self, rows: Rows, duplicates: list[tuple[str, str, list[int]]]) -> None:
        if self.file is None:  # every row came from this very file... which was never opened: cannot happen
            raise RuntimeError("an index run finished without an index file")
        live = {sha: (rows.paths[row], rows.stamps[row].tolist()) for row, sha in enumerate(rows.sha256)}
        self.file.finish(live, duplicates)
        if self.path != self.index_path:
            store.replace_with_built(self.file, self.index_path)
            logger.info("%s %s: rebuilt in the current format%s", self.index_path, self.replaces or "was unfinished",
                        " (every embedding reused)" if self.legacy_meta and self.previous.files else "")
        else:
            self.file.close()
        store.remove_legacy_files(self.index_path, self.legacy_meta)

    def close(self) -> None:
        for source in [self.file, *self.opened]:
            if source is not None:
                source.close()


# ------------------------------------------------------------------------------------------------ ImageSearch


class ImageSearch:
    """Text-to-image and image-to-image search over an indexed folder.

    The index (liteclip.search.store: one SQLite file holding each content's embedding, the file standing for it
    with its size and mtime, its copies, and the model's fingerprint) lets re-indexing encode only new or changed
    files, and an index made by another model is rebuilt rather than mixed. Indexing commits what it has encoded
    every `chunk_size` images, so a stopped run loses at most one chunk, and each chunk becomes searchable as it is
    done.
    """

    def __init__(self, pipeline: ZeroShotPipeline):
        self.pipeline = pipeline
        self.view = Rows().view()
        self.skipped: list[BadRow] = []  # files the last index() call could not decode
        self.progress = {"done": 0, "total": 0}  # images encoded by a running index() call, and how many it has
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        """How many distinct images are searchable now."""
        return self.view.count

    @property
    def paths(self) -> list[Path]:
        """Every searchable image's file (one per distinct content): a list built on each call."""
        view = self.view
        return [Path(path) for path in view.rows.paths[:view.count]]

    @property
    def embeddings(self) -> torch.Tensor:
        """(N, D) float32: the searchable embeddings (as searched, rounded to float16)."""
        return self.view.matrix.float()

    @property
    def ids(self) -> list[str]:
        """A stable id per indexed image (its content hash, shortened): the same across renames and re-indexing."""
        view = self.view
        return [view.rows.id(row) for row in range(view.count)]

    @property
    def fingerprint(self) -> str:
        """The model's weights' hash, read once: an index made by another model is never mixed with this one's."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.pipeline.model_dir)
        return self._fingerprint

    def indexed_file(self, identifier: str) -> tuple[Path, list[int]] | None:
        """The file and [size, mtime_ns] stamp the indexed image with this id was indexed from (None: no such id)."""
        view = self.view
        row = view.rows.row_of("id", identifier.lower(), view.count) if isinstance(identifier, str) else None
        return None if row is None else (view.path(row), view.stamp(row))

    def ids_of(self, paths: Sequence[Path]) -> list[str | None]:
        """The id of each indexed path (None for a path that is not, or no longer, in the index)."""
        view = self.view
        rows = [view.rows.row_of("path", str(path), view.count) for path in paths]
        return [None if row is None else view.rows.id(row) for row in rows]

    def index(self, source: str | Path | Sequence[str | Path], index_path: str | Path | None = None,
              batch_size: int = 64, show_progress: bool = True, num_workers: int = 0, chunk_size: int = 4096,
              faiss: bool | None = None) -> int:
        """Indexes every image under a folder, or a list of image files; returns how many were (re-)encoded.

        faiss: no longer used (the float16 scan replaced the FAISS copy); accepted so that older scripts run.
        """
        if faiss is not None:
            warnings.warn("ImageSearch.index(faiss=...) is no longer used: indexes are searched in memory as float16",
                          DeprecationWarning, stacklevel=2)
        if chunk_size < 1:
            raise InputError(f"chunk_size={chunk_size}: index at least one image per chunk")
        own_folders = store.derived_folders(Path(index_path)) if index_path is not None else []
        left_out: list[BadRow] = []  # links to nothing, pipes, unreadable folders: listed with what does not decode
        files = (list_images(source, exclude=own_folders, left_out_files=left_out) if isinstance(source, (str, Path))
                 else unique_paths(source))
        if index_path is not None and Path(index_path).suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"the index path {index_path} names an image file; give the index a name of its own, "
                             f"such as photos.index (nothing was written)")
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        target = IndexTarget(Path(index_path), self.fingerprint) if index_path is not None else None
        try:
            return self._index(files, source, left_out, target, batch_size, num_workers, chunk_size, show_progress)
        finally:
            if target is not None:
                target.close()

    def _index(self, files: list[Path], source: Any, left_out: list[BadRow], target: IndexTarget | None,
               batch_size: int, num_workers: int, chunk_size: int, show_progress: bool) -> int:
        previous = target.previous if target is not None else Previous()
        listed, stamps, self.skipped = readable_stamps(files)
        self.skipped = left_out + self.skipped
        hashes, known, unreadable_files = content_hashes(list(listed), stamps, previous)
        self.skipped += unreadable_files  # not indexed, so the next run tries them again
        keys = [key for key in listed if key in hashes]
        first = first_files(keys, hashes)
        todo = [key for sha, key in first.items() if sha not in known]  # one file per content not seen before
        wanted = {known[sha]: sha for sha in first if sha in known}
        rows = Rows(capacity=len(first))
        for number, shas, vectors in previous.embeddings(wanted):
            paths = [first[sha] for sha in shas]
            rows.append(shas, paths, [stamps[path] for path in paths], vectors)
            if target is not None and previous.sources[number] is not target.file:
                target.append(shas, paths, [stamps[path] for path in paths], vectors)
        self.view = rows.view()  # what is searchable already, while the rest is encoded
        encoded = self._encode(todo, rows, listed, stamps, hashes, target, batch_size, num_workers, chunk_size,
                               show_progress)
        if not len(rows):
            first_skipped = f" (first: {self.skipped[0]})" if self.skipped else ""
            raise DataError(f"none of the {len(files)} images in {source} decodes{first_skipped}")
        row_of = {sha: row for row, sha in enumerate(rows.sha256)}
        duplicates = [(key, hashes[key], stamps[key]) for key in keys
                      if hashes[key] in row_of and rows.paths[row_of[hashes[key]]] != key]
        if target is not None:
            target.finish(rows, duplicates)
        logger.info("indexed %d images, %d distinct (%d encoded, %d reused, %d skipped)",
                    len(rows) + len(duplicates), len(rows), encoded, len(keys) - len(todo), len(self.skipped))
        return encoded

    def _encode(self, todo: list[str], rows: Rows, listed: dict[str, Path], stamps: dict[str, list[int]],
                hashes: dict[str, str], target: IndexTarget | None, batch_size: int, num_workers: int,
                chunk_size: int, show_progress: bool) -> int:
        """Encodes the files `todo` names a chunk at a time, each chunk appended to `rows` and committed to the
        index file, then made searchable; returns how many were encoded."""
        self.progress = {"done": 0, "total": len(todo)}
        present = set(rows.sha256)
        encoded = 0
        with tqdm(total=len(todo), desc="indexing", unit="img", disable=not show_progress or not todo) as progress:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start:start + chunk_size]
                # each file is hashed again from the bytes it is decoded from: one changed since the hashing above
                # is filed under its new content, never its old content with the new one's embedding
                fresh = encode_decodable_image_files(self.pipeline.model, [listed[key] for key in chunk], batch_size,
                                                     self.pipeline.device, num_workers=num_workers, progress=progress,
                                                     hash_content=True, draft=True)
                new_rows, shas = [], []
                for row, j in enumerate(fresh.kept):
                    key = chunk[j]
                    hashes[key] = fresh.sha256[row]
                    if hashes[key] not in present:  # content already indexed under another file: a copy of it
                        present.add(hashes[key])
                        new_rows.append(row)
                        shas.append(hashes[key])
                paths = [chunk[fresh.kept[row]] for row in new_rows]
                vectors = fresh.embeds[new_rows].float().cpu().numpy() if new_rows else np.empty((0, 0), np.float32)
                if target is not None:
                    target.append(shas, paths, [stamps[path] for path in paths], vectors)
                rows.append(shas, paths, [stamps[path] for path in paths], vectors)
                encoded += len(fresh.kept)
                self.skipped += fresh.skipped  # not indexed, so the next run tries them again
                self.progress = {"done": min(start + chunk_size, len(todo)), "total": len(todo)}
                self.view = rows.view()  # one assignment: the old view or this one
        return encoded

    def load(self, index_path: str | Path) -> None:
        """Opens an index for search: its embeddings are read into memory as float16, a chunk at a time."""
        index_path = Path(index_path)
        if index_path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"{index_path} is an image file, not an index; pass the file `liteclip index` wrote "
                             f"(--index NAME)")
        if not index_path.is_file():
            raise FileNotFoundError(f"no index at {index_path}; build one with `liteclip index FOLDER --index "
                                    f"{index_path}`")
        if not store.is_sqlite(index_path):
            self.view = self._load_legacy(index_path)
            return
        # read-write when allowed: SQLite rolls back what a crashed writer left half done before reading
        index_file = IndexFile.open(index_path, writable=os.access(index_path, os.W_OK))
        try:
            if index_file.fingerprint != self.fingerprint:
                raise InputError(f"index {index_path} was built with another model; re-run `liteclip index`")
            rows = Rows(capacity=index_file.row_count())
            for _, chunk in index_file.chunks():
                rows.append(chunk.sha256, chunk.paths, chunk.stamps, chunk.embeddings)
        finally:
            index_file.close()
        self.view = rows.view()

    def _load_legacy(self, index_path: Path) -> SearchView:
        try:
            meta, embeddings = store.read_legacy(index_path)
        except ModelLoadError as error:
            raise ModelLoadError(f"{index_path} is not a liteclip search index, or is a damaged one ({error}); "
                                 f"{store.DAMAGED}") from None
        if meta.get("model") != self.fingerprint:
            raise InputError(f"index {index_path} was built with another model; re-run `liteclip index`")
        files = meta["files"]
        rows = Rows(capacity=len(files))
        rows.append([entry.get("sha256") for entry in files], [entry["path"] for entry in files],
                    [entry.get("stamp") or [0, 0] for entry in files], embeddings)
        return rows.view()

    def _rank(self, query_embed: torch.Tensor, top_k: int) -> list[tuple[Path, float]]:
        """The top_k existing files: one deleted since indexing is passed over (with a warning) for the next."""
        if top_k < 1:
            raise InputError(f"top_k={top_k}: ask for at least one image")
        view = self.view  # one consistent state, whatever a running index() publishes meanwhile
        if not view.count:
            raise InputError("the index is empty: call index(folder) or load(index_path) first")
        if query_embed.shape[-1] != view.matrix.shape[1]:
            raise InputError(f"the index holds {view.matrix.shape[1]}-wide embeddings and this model gives "
                             f"{query_embed.shape[-1]}-wide ones; run `liteclip index` again")
        k = min(top_k, view.count)
        while True:
            hits = [(view.path(row), score) for row, score in nearest(view, query_embed, k)]
            # os.path.isfile: a file this user may not reach (no permission) is passed over, never an error
            found = [(path, score) for path, score in hits if os.path.isfile(path)][:top_k]
            if len(found) == top_k or k == view.count:
                break
            k = min(view.count, 2 * k)
        last = hits.index(found[-1]) if found else len(hits) - 1
        gone = [path for path, _ in hits[:last + 1] if not os.path.isfile(path)]
        if gone:
            logger.warning("%d indexed file(s) among the nearest no longer exist (first: %s) and were passed over; "
                           "re-run `liteclip index` to drop them", len(gone), gone[0])
        return found

    def search(self, query: str, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images for a text query, with cosine similarities."""
        return self._rank(encode_texts(self.pipeline.model, [query], device=self.pipeline.device)[0].cpu(), top_k)

    def similar(self, image: ImageInput, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images most similar to `image`."""
        return self._rank(self.pipeline.encode_images([image])[0].cpu(), top_k)

    def query(self, query: str | Sequence[QueryTerm], top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images for a weighted query (liteclip.search.query): `2:golden retriever + ./pool.jpg -
        grass` adds twice the text's embedding and the image's and takes away the other text's. A string is read
        as the command line reads it (image files by path); the web page passes parse_web_query's terms, whose
        images are indexed ones, by id."""
        terms = parse_query(query) if isinstance(query, str) else list(query)
        texts = [term.text for term in terms if term.text is not None]
        images = [term.image for term in terms if term.image is not None]
        text_embeds = iter(encode_texts(self.pipeline.model, texts, device=self.pipeline.device).cpu() if texts
                           else [])
        image_embeds = iter(self.pipeline.encode_images(images).cpu() if images else [])

        def embedding(term: QueryTerm) -> torch.Tensor:
            if term.text is not None:
                return next(text_embeds)
            return next(image_embeds) if term.image is not None else self.indexed_embedding(term.indexed).cpu()

        # weights are scaled by the largest first: the direction is the same, and 1e300 * an embedding overflows
        largest = max(abs(term.weight) for term in terms)
        combined = sum((term.weight / largest) * embedding(term) for term in terms)
        if not torch.isfinite(combined).all():
            raise NonFiniteError(f"the model in {self.pipeline.model_dir} gives embeddings that are not finite (NaN "
                                 f"or infinity) for this query: its weights have diverged")
        if combined.norm() < 1e-6:
            raise InputError("the query's terms cancel each other out (their weighted sum is zero); change a weight "
                             "or a term")
        return self._rank(torch.nn.functional.normalize(combined, dim=-1), top_k)

    def indexed_embedding(self, identifier: str | None) -> torch.Tensor:
        """(D,) the embedding of the indexed image with this id; an unknown id is an InputError."""
        view = self.view
        row = view.rows.row_of("id", identifier.lower(), view.count) if isinstance(identifier, str) else None
        if row is None:
            raise InputError(f"no indexed image {identifier!r}")
        return view.matrix[row].float()

    def similar_to_indexed(self, identifier: str, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images most similar to the indexed image with this id (itself first)."""
        return self._rank(self.indexed_embedding(identifier), top_k)

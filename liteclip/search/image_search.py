"""Text-to-image and image-to-image search over an indexed folder: ImageSearch, what `liteclip index`, `search`
and `serve` run.

    search = ImageSearch(ZeroShotPipeline("model"))
    search.index("photos/", "photos.index")     # encodes only what the index does not hold yet
    search.query("2:golden retriever + ./pool.jpg - grass", top_k=5)

An index is keyed by content (SHA-256): a renamed, moved or copied photo is never encoded again, and identical copies
are shown once. A query always reads one whole state of the index (SearchView, replaced in one assignment), so the
web page can search while a folder is indexed. The file format is liteclip.search.store's.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from liteclip.data.captions import BadRow
from liteclip.data.image_folder import IMAGE_SUFFIXES, list_images
from liteclip.data.images import unreadable
from liteclip.embedding import encode_decodable_image_files, encode_texts
from liteclip.errors import DataError, InputError, ModelLoadError, NonFiniteError
from liteclip.files import file_stamp, sha256_of
from liteclip.pipeline import ImageInput, ZeroShotPipeline
from liteclip.pretrained import WEIGHTS_NAME
from liteclip.search.query import QueryTerm, parse_query
from liteclip.search.store import (Entries, IndexedFile, PartialIndex, derived_folders, entries_of, faiss_module,
                                   faiss_path, open_faiss, read_index, write_faiss, write_index)

logger = logging.getLogger(__name__)


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a saved model's weights: an index built by another model is not reused."""
    return sha256_of(Path(model_dir) / WEIGHTS_NAME)[:16]


class SearchView(NamedTuple):
    """What a search reads, replaced whole (one assignment), so a query running while index() works sees either the
    state before or the state after a chunk, never half of each."""

    paths: list[Path]  # one per distinct content: the first of its files
    embeddings: torch.Tensor  # (N, D); empty when a FAISS copy stands in for them
    faiss_index: Any | None
    ids: list[str]  # the content hash, shortened: stable across renames and re-indexing
    stamps: list[list[int]]  # each path's [size, mtime_ns] when indexed: a file changed since is not served as it


def nearest(view: SearchView, query_embed: torch.Tensor, k: int) -> list[tuple[Path, float]]:
    if view.faiss_index is not None:
        scores, rows = view.faiss_index.search(query_embed.float()[None].numpy(), k)
        values, indices = scores[0], rows[0]
    else:
        values, indices = (view.embeddings.to(query_embed.device) @ query_embed).topk(k)  # scores: (N,)
    return [(view.paths[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]


def content_groups(keys: list[str], hashes: dict[str, str], known: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Content -> its files, in listing order (the first stands for it), for every content with an embedding."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if hashes[key] in known:
            groups.setdefault(hashes[key], []).append(key)
    return groups


def view_of(keys: list[str], hashes: dict[str, str], known: dict[str, torch.Tensor],
            stamps: dict[str, list[int]]) -> SearchView:
    groups = content_groups(keys, hashes, known)
    embeddings = torch.stack([known[sha] for sha in groups]).cpu() if groups else torch.empty(0)
    return SearchView([Path(group[0]) for group in groups.values()], embeddings, None, [sha[:16] for sha in groups],
                      [stamps[group[0]] for group in groups.values()])


def first_of_each_new_content(keys: list[str], hashes: dict[str, str], known: dict[str, torch.Tensor]) -> list[str]:
    """One file per content not seen before: a renamed, moved or copied photo is never encoded again."""
    todo, queued = [], set()
    for key in keys:
        if hashes[key] not in known and hashes[key] not in queued:
            queued.add(hashes[key])
            todo.append(key)
    return todo


def readable_stamps(files: list[Path]) -> tuple[dict[str, Path], dict[str, list[int]], list[BadRow]]:
    """Each file by its key (its resolved path), and its [size, mtime_ns]; a file gone or unreadable since it was
    listed is skipped with the reason, not an error that stops the run."""
    paths, stamps, skipped = {}, {}, []
    for path in files:
        try:
            key = str(path.resolve())
            stamps[key] = file_stamp(path)
        except OSError as error:
            skipped.append(BadRow(path, 0, unreadable(path, error).reason))
            continue
        paths[key] = path
    return paths, stamps, skipped


def content_hashes(keys: list[str], stamps: dict[str, list], previous: Entries
                   ) -> tuple[dict[str, str], dict[str, torch.Tensor], list[BadRow]]:
    """Each file's SHA-256 (read again only when its stamp changed), the embeddings already known by content (an
    older index without hashes still lends its embeddings to files whose stamp has not changed), and the files that
    could not be read (skipped, with the reason)."""
    hashes, known, skipped = {}, {}, []
    for key in keys:
        entry = previous.get(key)
        unchanged = entry is not None and entry.stamp == stamps[key]
        try:
            hashes[key] = entry.sha256 if unchanged and entry.sha256 else sha256_of(key)
        except OSError as error:
            skipped.append(BadRow(Path(key), 0, unreadable(Path(key), error).reason))
            continue
        if unchanged:
            known[hashes[key]] = entry.embedding
    known.update({entry.sha256: entry.embedding for entry in previous.values() if entry.sha256})
    return hashes, known, skipped


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


class ImageSearch:
    """Text-to-image and image-to-image search over an indexed folder.

    The index (liteclip.search.store: embeddings as safetensors, with the file list, each file's size and mtime, and
    the model's fingerprint) is saved next to nothing else: re-indexing encodes only new or changed files, and an
    index made by another model is rebuilt rather than mixed. Indexing writes what it has encoded every
    `chunk_size` images, so a stopped run loses at most one chunk. With faiss-cpu installed, a FAISS copy is written
    too and `load` searches it memory-mapped instead of reading the embeddings into memory (same results: flat
    inner-product search is exact).
    """

    def __init__(self, pipeline: ZeroShotPipeline):
        self.pipeline = pipeline
        self.view = SearchView([], torch.empty(0), None, [], [])
        self.skipped: list[BadRow] = []  # files the last index() call could not decode
        self.progress = {"done": 0, "total": 0}  # images encoded by a running index() call, and how many it has

    @property
    def paths(self) -> list[Path]:
        return self.view.paths

    @property
    def embeddings(self) -> torch.Tensor:
        return self.view.embeddings

    @property
    def faiss_index(self) -> Any | None:
        """The index's FAISS copy, memory-mapped, when load() found a usable one (None: the embeddings are searched)."""
        return self.view.faiss_index

    @property
    def ids(self) -> list[str]:
        """A stable id per indexed image (its content hash, shortened): the same across renames and re-indexing."""
        return self.view.ids

    @cached_property
    def fingerprint(self) -> str:
        """The model's weights' hash, read once: an index made by another model is never mixed with this one's."""
        return model_fingerprint(self.pipeline.model_dir)

    def indexed_file(self, identifier: str) -> tuple[Path, list[int]] | None:
        """The file and [size, mtime_ns] stamp the indexed image with this id was indexed from (None: no such id)."""
        view = self.view
        identifier = identifier.lower() if isinstance(identifier, str) else None
        if identifier not in view.ids:
            return None
        row = view.ids.index(identifier)
        return view.paths[row], view.stamps[row]

    def ids_of(self, paths: Sequence[Path]) -> list[str | None]:
        """The id of each indexed path (None for a path that is not, or no longer, in the index)."""
        view = self.view
        ids = dict(zip(view.paths, view.ids))
        return [ids.get(Path(path)) for path in paths]

    def index(self, source: str | Path | Sequence[str | Path], index_path: str | Path | None = None,
              batch_size: int = 64, show_progress: bool = True, num_workers: int = 0, chunk_size: int = 4096,
              faiss: bool | None = None) -> int:
        """Indexes every image under a folder, or a list of image files; returns how many were (re-)encoded.

        faiss: write the FAISS copy (None: when faiss-cpu is installed).
        """
        own_folders = derived_folders(Path(index_path)) if index_path is not None else []  # its thumbnails, chunks
        left_out: list[BadRow] = []  # links to nothing, pipes, unreadable folders: listed with what does not decode
        files = (list_images(source, exclude=own_folders, left_out_files=left_out) if isinstance(source, (str, Path))
                 else unique_paths(source))
        if index_path is not None and Path(index_path).suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"the index path {index_path} names an image file; give the index a name of its own, "
                             f"such as photos.index (nothing was written)")
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {source}")
        if faiss and faiss_module() is None:
            raise InputError("faiss=True needs faiss-cpu: pip install 'liteclip[search]'")
        fingerprint = self.fingerprint
        index_path = Path(index_path) if index_path is not None else None
        partial = PartialIndex(index_path) if index_path is not None else None
        previous = self._previous_entries(index_path, fingerprint) if index_path is not None else {}
        listed, stamps, self.skipped = readable_stamps(files)
        self.skipped = left_out + self.skipped
        hashes, known, unreadable_files = content_hashes(list(listed), stamps, previous)
        self.skipped += unreadable_files  # not indexed, so the next run tries them again
        keys = [key for key in listed if key in hashes]
        todo = first_of_each_new_content(keys, hashes, known)
        self.view = view_of(keys, hashes, known, stamps)  # what is searchable already, while the rest is encoded
        encoded = self._encode(todo, keys, listed, stamps, hashes, known, partial, batch_size, num_workers,
                               chunk_size, show_progress)
        groups = content_groups(keys, hashes, known)
        if not groups:
            first = f" (first: {self.skipped[0]})" if self.skipped else ""
            raise DataError(f"none of the {len(files)} images in {source} decodes{first}")
        if index_path is not None:
            meta = {"model": fingerprint, "files": [
                {"path": group[0], "stamp": stamps[group[0]], "sha256": sha,
                 "duplicates": [{"path": key, "stamp": stamps[key]} for key in group[1:]]}
                for sha, group in groups.items()]}
            if faiss or (faiss is None and faiss_module() is not None):
                meta["faiss"] = write_faiss(index_path, self.embeddings)
            write_index(index_path, self.embeddings, meta)
            partial.remove()
        logger.info("indexed %d images, %d distinct (%d encoded, %d reused, %d skipped)",
                    sum(map(len, groups.values())), len(groups), encoded, len(keys) - len(todo), len(self.skipped))
        return encoded

    def _encode(self, todo: list[str], keys: list[str], listed: dict[str, Path], stamps: dict[str, list[int]],
                hashes: dict[str, str], known: dict[str, torch.Tensor], partial: PartialIndex | None,
                batch_size: int, num_workers: int, chunk_size: int, show_progress: bool) -> int:
        """Encodes the files `todo` names a chunk at a time (each chunk saved to `partial` and made searchable as it
        is done), filling `hashes` and `known`; returns how many were encoded."""
        self.progress = {"done": 0, "total": len(todo)}
        encoded = 0
        with tqdm(total=len(todo), desc="indexing", unit="img", disable=not show_progress or not todo) as progress:
            for start in range(0, len(todo), chunk_size):
                chunk = todo[start:start + chunk_size]
                # each file is hashed again from the bytes it is decoded from: one changed since the hashing above
                # is filed under its new content, never its old content with the new one's embedding
                fresh = encode_decodable_image_files(self.pipeline.model, [listed[key] for key in chunk], batch_size,
                                                     self.pipeline.device, num_workers=num_workers, progress=progress,
                                                     hash_content=True, draft=True)
                entries = {}
                for row, j in enumerate(fresh.kept):
                    key = chunk[j]
                    hashes[key] = fresh.sha256[row]
                    entries[key] = IndexedFile(stamps[key], fresh.embeds[row].cpu(), hashes[key])
                if partial is not None:
                    partial.append(self.fingerprint, entries)
                known.update({entry.sha256: entry.embedding for entry in entries.values()})
                encoded += len(entries)
                self.skipped += fresh.skipped  # not indexed, so the next run tries them again
                self.progress = {"done": min(start + chunk_size, len(todo)), "total": len(todo)}
                self.view = view_of(keys, hashes, known, stamps)  # one assignment: the old view or this one
        return encoded

    @staticmethod
    def _previous_entries(index_path: Path, fingerprint: str) -> Entries:
        """Embeddings an earlier index of the same model holds, and those an unfinished run left in chunks."""
        previous = {}
        if index_path.exists() and not index_path.is_file():
            raise InputError(f"the index path {index_path} is a folder; give the index a file name of its own, such "
                             f"as photos.index (nothing was written)")
        if index_path.is_file():
            try:
                meta, embeddings = read_index(index_path)
            except ModelLoadError:  # the user's own file of that name, or a damaged index: never written over
                raise InputError(f"{index_path} exists and is not a liteclip search index, so it is left as it is "
                                 f"and nothing was written; give --index another name (or, if it is a damaged "
                                 f"index of yours, delete it and index again)") from None
            if meta.get("model") == fingerprint:
                previous = entries_of(meta, embeddings)
        previous.update(PartialIndex(index_path).entries(fingerprint))
        return previous

    def load(self, index_path: str | Path) -> None:
        """Opens an index for search: its FAISS copy memory-mapped when there is one and faiss is installed, the
        embeddings read into memory otherwise."""
        index_path = Path(index_path)
        if index_path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"{index_path} is an image file, not an index; pass the file `liteclip index` wrote "
                             f"(--index NAME)")
        # the header is parsed once; the embeddings are read with it unless a FAISS copy may stand in for them
        faiss_copy = faiss_module() is not None and faiss_path(index_path).is_file()
        meta, embeddings = read_index(index_path, embeddings=not faiss_copy)
        if meta.get("model") != self.fingerprint:
            raise InputError(f"index {index_path} was built with another model; re-run `liteclip index`")
        paths = [Path(e["path"]) for e in meta["files"]]
        ids = [e["sha256"][:16] if e.get("sha256") else str(row) for row, e in enumerate(meta["files"])]
        faiss_index = open_faiss(index_path, meta)
        if faiss_index is None:  # no FAISS copy, or a stale one: search the embeddings themselves
            embeddings = embeddings if embeddings is not None else read_index(index_path)[1]
        self.view = SearchView(paths, torch.empty(0) if faiss_index is not None else embeddings, faiss_index, ids,
                               [e.get("stamp") for e in meta["files"]])

    def _rank(self, query_embed: torch.Tensor, top_k: int) -> list[tuple[Path, float]]:
        """The top_k existing files: one deleted since indexing is passed over (with a warning) for the next."""
        if top_k < 1:
            raise InputError(f"top_k={top_k}: ask for at least one image")
        view = self.view  # one consistent state, whatever a running index() publishes meanwhile
        if not view.paths:
            raise InputError("the index is empty: call index(folder) or load(index_path) first")
        k = min(top_k, len(view.paths))
        while True:
            hits = nearest(view, query_embed, k)
            found = [(path, score) for path, score in hits if path.is_file()][:top_k]
            if len(found) == top_k or k == len(view.paths):
                break
            k = min(len(view.paths), 2 * k)
        last = hits.index(found[-1]) if found else len(hits) - 1
        gone = [path for path, _ in hits[:last + 1] if not path.is_file()]
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
        identifier = identifier.lower() if isinstance(identifier, str) else identifier
        if identifier not in view.ids:
            raise InputError(f"no indexed image {identifier!r}")
        row = view.ids.index(identifier)
        if view.faiss_index is not None:
            return torch.from_numpy(view.faiss_index.reconstruct(row)).float()
        return view.embeddings[row].float()

    def similar_to_indexed(self, identifier: str, top_k: int = 5) -> list[tuple[Path, float]]:
        """The top_k indexed images most similar to the indexed image with this id (itself first)."""
        return self._rank(self.indexed_embedding(identifier), top_k)

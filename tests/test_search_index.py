"""The search index on disk: chunks written while indexing (and reused after a crash), and the FAISS copy that
search memory-maps, whose results equal exact search."""

from pathlib import Path

import pytest
import torch

from liteclip import pipeline as pipeline_module
from liteclip import search_index
from liteclip.pipeline import ImageSearch, ZeroShotPipeline
from tests.conftest import draw_image


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    for i in range(12):
        draw_image(folder / f"{i:02d}.png", (20 * i, 255 - 20 * i, (70 * i) % 255), size=32 + i)
    return folder


def test_faiss_search_memory_maps_the_vectors_and_ranks_exactly_as_exact_search(model_dir, photos, tmp_path,
                                                                                 monkeypatch):
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, faiss=True, show_progress=False)
    assert search_index.faiss_path(index_path).is_file()
    with_faiss = ImageSearch(ZeroShotPipeline(model_dir))
    with_faiss.load(index_path)
    assert with_faiss.faiss_index is not None and with_faiss.embeddings.numel() == 0  # the vectors stay on disk

    monkeypatch.setattr(search_index, "faiss_module", lambda: None)  # as without faiss-cpu installed
    exact = ImageSearch(ZeroShotPipeline(model_dir))
    exact.load(index_path)
    assert exact.faiss_index is None and exact.embeddings.shape[0] == 12
    for query in ("a red circle", "a photo of a cat", "two shapes"):
        fast, slow = with_faiss.search(query, top_k=12), exact.search(query, top_k=12)
        assert [p for p, _ in fast] == [p for p, _ in slow]
        assert [s for _, s in fast] == pytest.approx([s for _, s in slow], abs=1e-5)
    fast, slow = with_faiss.similar(photos / "05.png", top_k=3), exact.similar(photos / "05.png", top_k=3)
    assert [p for p, _ in fast] == [p for p, _ in slow] and fast[0][0].name == "05.png"


def test_a_faiss_file_the_index_did_not_record_is_not_used(model_dir, photos, tmp_path):
    index_path = tmp_path / "photos.index"
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, index_path, faiss=True, show_progress=False)
    faiss_file = search_index.faiss_path(index_path)
    faiss_file.write_bytes(faiss_file.read_bytes())  # another write: its stamp no longer matches the index's record
    search.load(index_path)
    assert search.faiss_index is None and search.embeddings.shape[0] == 12
    search.index(photos, index_path, faiss=False, show_progress=False)
    assert "faiss" not in search_index.read_index(index_path, embeddings=False)[0]


@pytest.mark.parametrize("faiss_installed", [False, True])
def test_loading_an_index_without_a_faiss_copy_reads_the_file_once(model_dir, photos, tmp_path, monkeypatch,
                                                                  faiss_installed):
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, show_progress=False, faiss=False)
    if not faiss_installed:
        monkeypatch.setattr(pipeline_module, "faiss_module", lambda: None)  # as without faiss-cpu installed
        monkeypatch.setattr(search_index, "faiss_module", lambda: None)
    reads = []

    def counting_read_index(path, embeddings=True):
        reads.append(embeddings)
        return search_index.read_index(path, embeddings)

    monkeypatch.setattr(pipeline_module, "read_index", counting_read_index)
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.load(index_path)
    assert reads == [True] and search.embeddings.shape[0] == 12  # one read: the header and the embeddings


def test_an_interrupted_index_keeps_its_chunks_and_the_next_run_encodes_only_the_rest(model_dir, photos, tmp_path,
                                                                                     monkeypatch):
    index_path = tmp_path / "photos.index"
    real = pipeline_module.encode_decodable_image_files
    calls = []

    def crash_on_third_chunk(model, paths, *args, **kwargs):
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped")
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "encode_decodable_image_files", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, chunk_size=5, show_progress=False)
    partial = index_path.with_name(".photos.index.partial")
    assert len(list(partial.glob("chunk-*.safetensors"))) == 2 and not index_path.exists()

    monkeypatch.setattr(pipeline_module, "encode_decodable_image_files", real)
    resumed = ImageSearch(ZeroShotPipeline(model_dir))
    assert resumed.index(photos, index_path, chunk_size=5, show_progress=False) == 2  # 12 - 2 chunks of 5
    assert not partial.exists()
    fresh = ImageSearch(ZeroShotPipeline(model_dir))
    fresh.index(photos, tmp_path / "fresh.index", show_progress=False)
    assert resumed.paths == fresh.paths
    torch.testing.assert_close(resumed.embeddings, fresh.embeddings, atol=1e-5, rtol=1e-5)


def test_asking_for_faiss_without_it_installed_says_how_to_get_it(model_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_module, "faiss_module", lambda: None)
    with pytest.raises(Exception, match=r"pip install 'liteclip\[search\]'"):
        ImageSearch(ZeroShotPipeline(model_dir)).index(photos, tmp_path / "x.index", faiss=True)


def test_indexing_after_loading_a_faiss_index_searches_the_new_embeddings(model_dir, photos, tmp_path):
    index_path = tmp_path / "photos.index"
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(sorted(photos.iterdir())[:4], index_path, faiss=True, show_progress=False)
    search.load(index_path)
    assert search.faiss_index is not None
    search.index(photos, show_progress=False)  # in memory only: 12 images now
    hits = search.search("a red circle", top_k=12)
    assert len(hits) == 12 and {p.name for p, _ in hits} == {p.name for p in photos.iterdir()}


# ------------------------------------------------------------------------------- keyed by content (issue 30)


def counting_encoder(monkeypatch) -> list[int]:
    """Counts the images the index encodes, through the library's own encoder."""
    encoded: list[int] = []
    original = pipeline_module.encode_decodable_image_files

    def counted(model, paths, *args, **kwargs):
        encoded.append(len(paths))
        return original(model, paths, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "encode_decodable_image_files", counted)
    return encoded


def test_a_renamed_or_moved_photo_is_not_encoded_again(model_dir, photos, tmp_path, monkeypatch):
    index_path = tmp_path / "photos.index"
    search = ImageSearch(ZeroShotPipeline(model_dir))
    assert search.index(photos, index_path, show_progress=False) == 12
    before = dict(zip(search.paths, search.embeddings))
    (photos / "03.png").rename(photos / "renamed.png")
    (photos / "sub").mkdir()
    (photos / "04.png").rename(photos / "sub" / "moved.png")
    encoded = counting_encoder(monkeypatch)
    assert search.index(photos, index_path, show_progress=False) == 0 and sum(encoded) == 0
    after = dict(zip(search.paths, search.embeddings))
    assert torch.equal(after[(photos / "renamed.png").resolve()], before[(photos / "03.png").resolve()])
    assert torch.equal(after[(photos / "sub" / "moved.png").resolve()], before[(photos / "04.png").resolve()])
    assert len(search.paths) == 12 and not any(path.name in ("03.png", "04.png") for path in search.paths)


def test_identical_copies_are_encoded_once_and_shown_once(model_dir, photos, tmp_path, monkeypatch):
    import shutil

    for copy in ("copy_a.png", "copy_b.png"):
        shutil.copy(photos / "07.png", photos / copy)
    encoded = counting_encoder(monkeypatch)
    index_path = tmp_path / "photos.index"
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, index_path, show_progress=False)
    assert sum(encoded) == 12 and len(search.paths) == 12  # 14 files, 12 distinct contents
    hits = search.similar(photos / "07.png", top_k=12)
    assert [path.name for path, _ in hits].count("07.png") == 1 and not any("copy" in p.name for p, _ in hits)
    meta, _ = search_index.read_index(index_path)
    row = next(entry for entry in meta["files"] if entry["path"].endswith("07.png"))
    assert sorted(Path(d["path"]).name for d in row["duplicates"]) == ["copy_a.png", "copy_b.png"]
    (photos / "07.png").unlink()  # the copies stand in for it at the next run, still without encoding
    assert search.index(photos, index_path, show_progress=False) == 0 and sum(encoded) == 12
    assert [path.name for path in search.paths].count("copy_a.png") == 1


def test_an_index_written_before_content_hashes_still_lends_its_embeddings(model_dir, photos, tmp_path,
                                                                            monkeypatch):
    index_path = tmp_path / "photos.index"
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, index_path, show_progress=False)
    meta, embeddings = search_index.read_index(index_path)
    for entry in meta["files"]:  # the older format: path and stamp only
        entry.pop("sha256")
        entry.pop("duplicates")
    search_index.write_index(index_path, embeddings, meta)
    encoded = counting_encoder(monkeypatch)
    assert search.index(photos, index_path, show_progress=False) == 0 and sum(encoded) == 0
    assert all(entry.get("sha256") for entry in search_index.read_index(index_path)[0]["files"])

"""ImageSearch over an indexed folder: incremental indexing keyed by content, the index on disk (chunks written
while indexing and reused after a crash, the FAISS copy whose results equal exact search), files that change or
resist while indexed, and ranking."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from liteclip import build_model
from liteclip.errors import ModelLoadError
from liteclip.pipeline import ZeroShotPipeline
from liteclip.search import image_search as image_search_module
from liteclip.search import store
from liteclip.search.image_search import ImageSearch
from tests.conftest import draw_image


@pytest.fixture
def images(tmp_path):
    return [draw_image(tmp_path / "examples" / f"{name}.jpg", color)
            for name, color in (("cat", (200, 30, 30)), ("dog", (30, 200, 30)), ("baby", (30, 30, 200)))]


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
    assert store.faiss_path(index_path).is_file()
    with_faiss = ImageSearch(ZeroShotPipeline(model_dir))
    with_faiss.load(index_path)
    assert with_faiss.faiss_index is not None and with_faiss.embeddings.numel() == 0  # the vectors stay on disk

    monkeypatch.setattr(store, "faiss_module", lambda: None)  # as without faiss-cpu installed
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
    faiss_file = store.faiss_path(index_path)
    faiss_file.write_bytes(faiss_file.read_bytes())  # another write: its stamp no longer matches the index's record
    search.load(index_path)
    assert search.faiss_index is None and search.embeddings.shape[0] == 12
    search.index(photos, index_path, faiss=False, show_progress=False)
    assert "faiss" not in store.read_index(index_path, embeddings=False)[0]


@pytest.mark.parametrize("faiss_installed", [False, True])
def test_loading_an_index_without_a_faiss_copy_reads_the_file_once(model_dir, photos, tmp_path, monkeypatch,
                                                                  faiss_installed):
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, show_progress=False, faiss=False)
    if not faiss_installed:
        monkeypatch.setattr(image_search_module, "faiss_module", lambda: None)  # as without faiss-cpu installed
        monkeypatch.setattr(store, "faiss_module", lambda: None)
    reads = []

    def counting_read_index(path, embeddings=True):
        reads.append(embeddings)
        return store.read_index(path, embeddings)

    monkeypatch.setattr(image_search_module, "read_index", counting_read_index)
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.load(index_path)
    assert reads == [True] and search.embeddings.shape[0] == 12  # one read: the header and the embeddings


def test_an_interrupted_index_keeps_its_chunks_and_the_next_run_encodes_only_the_rest(model_dir, photos, tmp_path,
                                                                                     monkeypatch):
    index_path = tmp_path / "photos.index"
    real = image_search_module.encode_decodable_image_files
    calls = []

    def crash_on_third_chunk(model, paths, *args, **kwargs):
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped")
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(image_search_module, "encode_decodable_image_files", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, chunk_size=5, show_progress=False)
    partial = index_path.with_name(".photos.index.partial")
    assert len(list(partial.glob("chunk-*.safetensors"))) == 2 and not index_path.exists()

    monkeypatch.setattr(image_search_module, "encode_decodable_image_files", real)
    resumed = ImageSearch(ZeroShotPipeline(model_dir))
    assert resumed.index(photos, index_path, chunk_size=5, show_progress=False) == 2  # 12 - 2 chunks of 5
    assert not partial.exists()
    fresh = ImageSearch(ZeroShotPipeline(model_dir))
    fresh.index(photos, tmp_path / "fresh.index", show_progress=False)
    assert resumed.paths == fresh.paths
    torch.testing.assert_close(resumed.embeddings, fresh.embeddings, atol=1e-5, rtol=1e-5)


def test_asking_for_faiss_without_it_installed_says_how_to_get_it(model_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(image_search_module, "faiss_module", lambda: None)
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
    original = image_search_module.encode_decodable_image_files

    def counted(model, paths, *args, **kwargs):
        encoded.append(len(paths))
        return original(model, paths, *args, **kwargs)

    monkeypatch.setattr(image_search_module, "encode_decodable_image_files", counted)
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
    meta, _ = store.read_index(index_path)
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
    meta, embeddings = store.read_index(index_path)
    for entry in meta["files"]:  # the older format: path and stamp only
        entry.pop("sha256")
        entry.pop("duplicates")
    store.write_index(index_path, embeddings, meta)
    encoded = counting_encoder(monkeypatch)
    assert search.index(photos, index_path, show_progress=False) == 0 and sum(encoded) == 0
    assert all(entry.get("sha256") for entry in store.read_index(index_path)[0]["files"])


# ------------------------------------------------------------------------- files that change or resist (issue 38)


def test_a_photo_changed_between_hashing_and_encoding_is_filed_under_what_was_encoded(model_dir, photos, tmp_path,
                                                                                     monkeypatch):
    """Issue 38: a photo overwritten after it was hashed and before it was encoded kept the new content's embedding
    under the old content's hash, and later copies of the old content reused it."""
    import hashlib

    changed = photos / "03.png"
    old_content = changed.read_bytes()
    real_hashes = image_search_module.content_hashes

    def then_overwritten(*args, **kwargs):
        found = real_hashes(*args, **kwargs)
        draw_image(changed, (250, 250, 10), size=50)  # rewritten by another program meanwhile
        return found

    monkeypatch.setattr(image_search_module, "content_hashes", then_overwritten)
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, tmp_path / "photos.index", show_progress=False)
    monkeypatch.undo()
    truth = search.pipeline.encode_images  # the embedding of whatever a file holds now
    row = search.paths.index(changed.resolve())
    assert search.ids[row] == hashlib.sha256(changed.read_bytes()).hexdigest()[:16]
    torch.testing.assert_close(search.embeddings[row], truth([changed])[0], atol=1e-5, rtol=0)
    (photos / "copy_of_the_old_03.png").write_bytes(old_content)  # the old content arrives again later
    assert search.index(photos, tmp_path / "photos.index", show_progress=False) == 1  # encoded, not reused wrongly
    copy = search.paths.index((photos / "copy_of_the_old_03.png").resolve())
    torch.testing.assert_close(search.embeddings[copy], truth([photos / "copy_of_the_old_03.png"])[0], atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("where", ["hashing", "decoding"])
def test_an_unreadable_photo_is_skipped_and_counted_and_the_rest_indexed(model_dir, photos, tmp_path, monkeypatch,
                                                                         capsys, where):
    """Issue 38: one unreadable (chmod 000) photo stopped `liteclip index`. (The suite may run as root, for whom
    chmod 000 reads anyway, so the refusal is the operating system's error, raised where it would be.)"""
    import json

    from liteclip.files import sha256_of
    from liteclip.cli import main

    locked = str((photos / "07.png").resolve())
    if where == "hashing":
        monkeypatch.setattr(image_search_module, "sha256_of", lambda path: sha256_of(path) if str(path) != locked
                            else (_ for _ in ()).throw(PermissionError(13, "Permission denied", locked)))
    else:
        real_read = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda path: real_read(path) if str(path.resolve()) != locked
                            else (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path))))
    assert main(["index", str(photos), "--index", str(tmp_path / "p.index"), "--model-dir", str(model_dir),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 11 and len(report["skipped"]) == 1
    assert report["skipped"][0]["reason"] == "cannot be read (permission denied)"


def test_a_photo_gone_between_listing_and_hashing_is_skipped_not_a_stop(model_dir, photos, tmp_path, monkeypatch):
    real_list = image_search_module.list_images
    monkeypatch.setattr(image_search_module, "list_images",
                        lambda *args, **kwargs: real_list(*args, **kwargs) + [photos / "gone.png"])
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, tmp_path / "p.index", show_progress=False)
    assert len(search.paths) == 12 and [row.reason for row in search.skipped] == [
        "is gone (moved or deleted since it was listed)"]


def test_print0_separates_paths_with_nul_so_a_newline_in_a_name_cannot_split_one(model_dir, photos, tmp_path,
                                                                                 capsysbinary):
    from liteclip.cli import main

    odd = photos / "two\nlines.png"
    draw_image(odd, (1, 250, 1))
    assert main(["index", str(photos), "--index", str(tmp_path / "p.index"), "--model-dir", str(model_dir)]) == 0
    capsysbinary.readouterr()
    assert main(["search", "x", "--index", str(tmp_path / "p.index"), "--model-dir", str(model_dir), "--print0",
                 "--top-k", "13"]) == 0
    printed = capsysbinary.readouterr().out.split(b"\0")
    assert printed[-1] == b"" and len(printed) == 14
    assert str(odd.resolve()).encode() in printed[:-1]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_index_path_naming_a_file_or_folder_of_the_users_is_refused_and_left_as_it_was(model_dir, photos,
                                                                                         tmp_path, capsys, kind):
    from liteclip.cli import main
    from tests.user_files import assert_user_files_untouched, plant_user_files, snapshot

    if kind == "file":
        target = tmp_path / "notes.txt"
        target.write_text("my notes")
        before = snapshot(tmp_path)
    else:
        target = tmp_path / "albums"
        before = plant_user_files(target)
    assert main(["index", str(photos), "--index", str(target), "--model-dir", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert ("is not a liteclip search index, so it is left as it is" if kind == "file" else "is a folder") in err
    assert_user_files_untouched(tmp_path if kind == "file" else target, before, exactly=True)


def test_index_is_incremental_and_search_returns_paths(model_dir, tmp_path):
    folder = tmp_path / "photos"
    for i in range(5):
        draw_image(folder / f"{i}.png", (50 * i, 100, 150))
    search = ImageSearch(ZeroShotPipeline(model_dir))
    index_path = tmp_path / "photos.index"
    assert search.index(folder, index_path, show_progress=False) == 5
    assert search.index(folder, index_path, show_progress=False) == 0  # nothing changed
    draw_image(folder / "new.png", (1, 2, 3))
    draw_image(folder / "0.png", (9, 9, 9), size=48)  # changed file
    assert search.index(folder, index_path, show_progress=False) == 2
    hits = search.search("a red circle", top_k=3)
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]
    assert all(path.parent == folder.resolve() for path, _ in hits)
    same = search.similar(folder / "3.png", top_k=1)
    assert same[0][0].name == "3.png" and same[0][1] == pytest.approx(1.0, abs=1e-4)
    fresh = ImageSearch(ZeroShotPipeline(model_dir))
    fresh.load(index_path)
    loaded = fresh.search("a red circle", top_k=3)  # through the FAISS copy when faiss-cpu is installed
    assert [p for p, _ in loaded] == [p for p, _ in hits]
    assert [s for _, s in loaded] == pytest.approx([s for _, s in hits], abs=1e-5)


def test_empty_folder_is_an_error(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageSearch(ZeroShotPipeline(model_dir)).index(tmp_path / "empty")


def test_search_ranks_a_planted_match_first_after_a_few_training_steps(tiny_config, tmp_path):
    from liteclip.data.captions import CaptionCollator
    from liteclip.train.optim import build_optimizer
    from liteclip.precision import Precision
    from liteclip.train.loop import contrastive_step, optimizer_step

    colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
    toy = {name: draw_image(tmp_path / "toy" / f"{name}.png", rgb) for name, rgb in colors.items()}
    torch.manual_seed(0)
    model = build_model(tiny_config.model)
    pipeline = ZeroShotPipeline(tmp_path, model=model, device="cpu")  # its eval transform, for identical preprocessing
    samples = [{"pixel_values": pipeline.transform(np.asarray(Image.open(path).convert("RGB"))),
                "caption": f"a {name} square", "image_index": i} for i, (name, path) in enumerate(toy.items())]
    batch = CaptionCollator(model.tokenizer, 16)(samples)
    batch.pop("image_index")
    optimizer = build_optimizer(model, tiny_config.optim)
    model.train()
    for _ in range(40):
        contrastive_step(model, [batch], Precision(None, "cpu"), None)
        optimizer_step(model, optimizer, None, 1.0)
    model.save_pretrained(tmp_path / "trained")

    folder = tmp_path / "gallery"
    planted = draw_image(folder / "photo_017.png", colors["red"])
    for name in ("green", "blue", "yellow"):
        draw_image(folder / f"photo_{name}.png", colors[name])
    search = ImageSearch(ZeroShotPipeline(tmp_path / "trained"))
    search.index(folder, show_progress=False)
    hits = search.search("a red square", top_k=4)
    assert hits[0][0] == planted.resolve()
    assert hits[0][1] > hits[1][1]


def test_a_damaged_index_or_weights_file_is_named_not_a_raw_safetensors_error(model_dir, tmp_path, images):
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(images, tmp_path / "photos.index", show_progress=False)
    index_bytes = (tmp_path / "photos.index").read_bytes()
    (tmp_path / "photos.index").write_bytes(index_bytes[: len(index_bytes) // 2])
    with pytest.raises(ModelLoadError, match=r"photos\.index is damaged.*liteclip index"):
        ImageSearch(ZeroShotPipeline(model_dir)).load(tmp_path / "photos.index")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])  # the header overwritten
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is damaged"):
        ZeroShotPipeline(model_dir)


def test_a_path_given_twice_is_indexed_once(model_dir, tmp_path):
    paths = [draw_image(tmp_path / f"{i}.png", (60 * i, 9, 9)) for i in range(3)]
    search = ImageSearch(ZeroShotPipeline(model_dir, device="cpu"))
    search.index([paths[0], paths[1], paths[0], str(paths[2]), tmp_path / "." / "1.png"], tmp_path / "i.index",
                 show_progress=False)
    assert search.paths == [p.resolve() for p in paths] and search.embeddings.shape[0] == 3


def test_search_passes_over_files_deleted_since_indexing_and_says_so(model_dir, tmp_path, caplog):
    folder = tmp_path / "photos"
    for i in range(6):
        draw_image(folder / f"{i}.png", (40 * i, 100, 9))
    search = ImageSearch(ZeroShotPipeline(model_dir, device="cpu"))
    search.index(folder, tmp_path / "p.index", show_progress=False)
    full = search.search("a red circle", top_k=6)
    for path, _ in full[:2]:  # the two best hits are gone
        path.unlink()
    search.load(tmp_path / "p.index")
    with caplog.at_level("WARNING", logger="liteclip.search.image_search"):
        hits = search.search("a red circle", top_k=3)
    assert hits == [(path, pytest.approx(score, abs=1e-5)) for path, score in full[2:5]]
    assert "2 indexed file(s) among the nearest no longer exist" in caplog.text and "liteclip index" in caplog.text


def test_links_to_nowhere_and_pipes_are_listed_with_the_files_that_do_not_decode(model_dir, photos, tmp_path, capsys):
    """Second review of issue 38: `liteclip index --json` listed only undecodable files; links to nothing and pipes
    were left out of its list."""
    import json
    import os

    from liteclip.cli import main

    (photos / "moved.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(photos / "pipe.png")
    assert main(["index", str(photos), "--index", str(tmp_path / "p.index"), "--model-dir", str(model_dir),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    reasons = {Path(row["path"]).name: row["reason"] for row in report["skipped"]}
    assert reasons == {"moved.jpg": "a link that leads to no file",
                       "pipe.png": "not a regular file (a pipe, a device, a socket)"}
    assert report["images"] == 12

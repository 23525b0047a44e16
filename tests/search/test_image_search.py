"""ImageSearch over an indexed folder: incremental indexing keyed by content, the index on disk (chunks written
while indexing and reused after a crash, the FAISS copy whose results equal exact search), files that change or
resist while indexed, and ranking."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from liteclip import build_model
from liteclip.errors import InputError, ModelLoadError
from liteclip.pipeline import ZeroShotPipeline
from liteclip.search import image_search as image_search_module
from liteclip.search import store
from liteclip.search.image_search import ImageSearch
from tests.conftest import draw_image
from tests.search.conftest import stop_encoding_at_chunk


@pytest.fixture
def images(tmp_path):
    return [draw_image(tmp_path / "examples" / f"{name}.jpg", color)
            for name, color in (("cat", (200, 30, 30)), ("dog", (30, 200, 30)), ("baby", (30, 30, 200)))]


def reference_ranking(search: ImageSearch, files: list[Path], query_embed: torch.Tensor) -> list[tuple[Path, float]]:
    """Exact float32 search written out here: every file encoded afresh, scored by cosine, best first."""
    embeds = torch.nn.functional.normalize(search.pipeline.encode_images(files).float(), dim=-1)
    scores = embeds @ query_embed.float()
    order = scores.argsort(descending=True).tolist()
    return [(files[i].resolve(), float(scores[i])) for i in order]


def test_float16_search_ranks_as_exact_float32_search_and_scores_within_1e_3(model_dir, photos, tmp_path):
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, tmp_path / "photos.index", show_progress=False)
    assert search.view.matrix.dtype == torch.float16
    files = sorted(photos.iterdir())
    for query in ("a red circle", "a green square", "blue"):
        query_embed = search.pipeline.encode_labels([query], templates=["{}"])[0].cpu()
        expected = reference_ranking(search, files, query_embed)
        hits = search.search(query, top_k=12)
        assert [score for _, score in hits] == pytest.approx([score for _, score in expected], abs=1e-3)
        gaps = [a - b for (_, a), (_, b) in zip(expected, expected[1:])]
        if min(gaps) > 2e-3:  # no near-ties: float16 cannot reorder them
            assert [path for path, _ in hits] == [path for path, _ in expected]


def test_appending_chunk_by_chunk_gives_the_view_of_indexing_at_once(model_dir, photos, tmp_path):
    """Issue 43: each chunk is appended, never the whole view rebuilt; the end state is the same as one chunk."""
    at_once = ImageSearch(ZeroShotPipeline(model_dir))
    at_once.index(photos, tmp_path / "once.index", chunk_size=4096, show_progress=False)
    by_chunks = ImageSearch(ZeroShotPipeline(model_dir))
    views = []
    original = image_search_module.Rows.view

    def kept(rows):
        views.append(original(rows))
        return views[-1]

    image_search_module.Rows.view = kept
    try:
        by_chunks.index(photos, tmp_path / "chunks.index", chunk_size=5, show_progress=False)
    finally:
        image_search_module.Rows.view = original
    assert [view.count for view in views] == [0, 5, 10, 12]
    for view in views:  # every published view stayed what it was when published, with all rows up to its count
        assert view.matrix.shape[0] == view.count and len(view.rows) >= view.count
    assert views[1].matrix.data_ptr() == views[-1].matrix.data_ptr()  # one buffer, appended to, never re-stacked
    assert by_chunks.paths == at_once.paths and by_chunks.ids == at_once.ids
    assert torch.equal(by_chunks.embeddings, at_once.embeddings)
    for name in ("once.index", "chunks.index"):
        loaded = ImageSearch(ZeroShotPipeline(model_dir))
        loaded.load(tmp_path / name)
        assert sorted(zip(loaded.ids, loaded.paths)) == sorted(zip(at_once.ids, at_once.paths))


def test_a_view_taken_before_appends_keeps_its_rows_when_the_matrix_grows():
    rows = image_search_module.Rows(capacity=2)
    first = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    rows.append(["a" * 64, "b" * 64], ["/p/a", "/p/b"], [[1, 2], [3, 4]], first)
    before = rows.view()
    more = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    rows.append([f"{i}" * 64 for i in range(5)], [f"/p/{i}" for i in range(5)], [[i, i] for i in range(5)], more)  # grows
    after = rows.view()
    assert before.count == 2 and torch.equal(before.matrix, first.half()) and after.count == 7
    assert torch.equal(after.matrix, torch.cat([first, more]).half())
    assert rows.row_of("path", "/p/3", before.count) is None and rows.row_of("path", "/p/3", after.count) == 5
    assert rows.row_of("id", "b" * 16, before.count) == 1 and before.stamp(1) == [3, 4]
    roomy = image_search_module.Rows(capacity=4)
    roomy.append(["c" * 64], ["/p/c"], [[1, 1]], first[:1])
    with pytest.raises(InputError, match="width 16 cannot join an index of width 8"):  # room left, still refused
        roomy.append(["d" * 64], ["/p/d"], [[1, 1]], torch.ones(1, 16))
    assert len(roomy) == 1


def test_an_interrupted_index_keeps_its_chunks_and_the_next_run_encodes_only_the_rest(model_dir, photos, tmp_path,
                                                                                     monkeypatch):
    index_path = tmp_path / "photos.index"
    real = stop_encoding_at_chunk(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, chunk_size=5, show_progress=False)
    interrupted = ImageSearch(ZeroShotPipeline(model_dir))
    interrupted.load(index_path)  # the two committed chunks are an index already
    assert len(interrupted) == 10

    monkeypatch.setattr(image_search_module, "encode_decodable_image_files", real)
    resumed = ImageSearch(ZeroShotPipeline(model_dir))
    assert resumed.index(photos, index_path, chunk_size=5, show_progress=False) == 2  # 12 - 2 chunks of 5
    fresh = ImageSearch(ZeroShotPipeline(model_dir))
    fresh.index(photos, tmp_path / "fresh.index", show_progress=False)
    assert sorted(resumed.paths) == sorted(fresh.paths)
    assert dict(zip(resumed.ids, resumed.embeddings.tolist())) == dict(zip(fresh.ids, fresh.embeddings.tolist()))


def test_the_faiss_argument_of_older_scripts_is_accepted_with_a_warning(model_dir, photos, tmp_path):
    with pytest.warns(DeprecationWarning, match="no longer used"):
        ImageSearch(ZeroShotPipeline(model_dir)).index(photos, tmp_path / "x.index", faiss=True,
                                                       show_progress=False)


def test_indexing_after_loading_an_index_searches_the_new_embeddings(model_dir, photos, tmp_path):
    index_path = tmp_path / "photos.index"
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(sorted(photos.iterdir())[:4], index_path, show_progress=False)
    search.load(index_path)
    assert len(search) == 4
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
    index_file = store.IndexFile.open(index_path)
    assert sorted(Path(path).name for path, _, _ in index_file.duplicates()) == ["copy_a.png", "copy_b.png"]
    index_file.close()
    (photos / "07.png").unlink()  # the copies stand in for it at the next run, still without encoding
    assert search.index(photos, index_path, show_progress=False) == 0 and sum(encoded) == 12
    assert [path.name for path in search.paths].count("copy_a.png") == 1


def write_older_index(path: Path, fingerprint: str, files: list[dict], embeddings: torch.Tensor) -> None:
    """The format before issue 43, written out here: one safetensors file, its rows as JSON in the header."""
    import json

    from safetensors.torch import save_file

    save_file({"embeddings": embeddings.contiguous()}, str(path),
              metadata={"liteclip_index": json.dumps({"model": fingerprint, "files": files})})


def older_rows(search: ImageSearch, hashes: bool = True) -> list[dict]:
    import hashlib
    import os

    rows = []
    for path in search.paths:
        row = {"path": str(path), "stamp": [os.stat(path).st_size, os.stat(path).st_mtime_ns]}
        if hashes:
            row["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append(row)
    return rows


@pytest.mark.parametrize("hashes", [True, False])
def test_an_index_of_the_older_format_loads_and_is_rebuilt_reusing_every_embedding(model_dir, photos, tmp_path,
                                                                                   monkeypatch, caplog, hashes):
    """Issue 43: indexes written before this format load as they are, and the next `index` rewrites them in the
    new one without encoding anything (rows written before content hashes lend their embeddings by stamp)."""
    import logging
    import os

    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, show_progress=False)  # in memory: the embeddings the older index would hold
    index_path = tmp_path / "photos.index"
    write_older_index(index_path, search.fingerprint, older_rows(search, hashes), search.embeddings)
    faiss_copy = store.legacy_faiss_path(index_path)
    faiss_copy.write_bytes(b"the flat copy older versions wrote")
    if hashes:  # the older index recorded its copy's stamp: it is liteclip's, and goes with the upgrade
        write_older_index(index_path, search.fingerprint,
                          older_rows(search, hashes), search.embeddings)
        import json

        from safetensors.torch import save_file
        meta = {"model": search.fingerprint, "files": older_rows(search, hashes),
                "faiss": [os.stat(faiss_copy).st_size, os.stat(faiss_copy).st_mtime_ns]}
        save_file({"embeddings": search.embeddings.contiguous()}, str(index_path),
                  metadata={"liteclip_index": json.dumps(meta)})
    loaded = ImageSearch(ZeroShotPipeline(model_dir))
    loaded.load(index_path)
    assert loaded.paths == search.paths and torch.equal(loaded.embeddings, search.embeddings)
    assert loaded.ids == (search.ids if hashes else [str(row) for row in range(12)])
    encoded = counting_encoder(monkeypatch)
    with caplog.at_level(logging.INFO, logger="liteclip.search.image_search"):
        assert loaded.index(photos, index_path, show_progress=False) == 0 and sum(encoded) == 0
    assert "was written by an older liteclip: rebuilt in the current format" in caplog.text
    assert store.is_sqlite(index_path) and not store.building_path(index_path).exists()
    assert faiss_copy.exists() != hashes  # an unrecorded file of that name is not liteclip's to delete
    again = ImageSearch(ZeroShotPipeline(model_dir))
    again.load(index_path)
    assert again.ids == search.ids and torch.equal(again.embeddings, search.embeddings)


def test_chunks_an_older_liteclip_left_are_reused_and_then_removed_but_no_other_file(model_dir, photos, tmp_path, monkeypatch):
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, show_progress=False)
    index_path = tmp_path / "photos.index"
    chunks = store.legacy_chunks_folder(index_path)
    chunks.mkdir()
    (chunks / ".liteclip-derived").write_text("made by liteclip")
    write_older_index(chunks / "chunk-000000.safetensors", search.fingerprint, older_rows(search)[:7],
                      search.embeddings[:7])
    (chunks / "chunk-000001.safetensors").write_bytes(b"not an index chunk: the user's, whatever its name")
    encoded = counting_encoder(monkeypatch)
    assert search.index(photos, index_path, show_progress=False) == 5 and sum(encoded) == 5
    assert sorted(path.name for path in chunks.iterdir()) == [".liteclip-derived", "chunk-000001.safetensors"]
    assert (chunks / "chunk-000001.safetensors").read_bytes() == b"not an index chunk: the user's, whatever its name"
    (chunks / "chunk-000001.safetensors").unlink()
    search.index(photos, index_path, show_progress=False)
    assert not chunks.exists()  # once only liteclip's own files are left, the folder goes


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
    torch.testing.assert_close(search.embeddings[row], truth([changed])[0], atol=1e-3, rtol=0)  # float16
    (photos / "copy_of_the_old_03.png").write_bytes(old_content)  # the old content arrives again later
    assert search.index(photos, tmp_path / "photos.index", show_progress=False) == 1  # encoded, not reused wrongly
    copy = search.paths.index((photos / "copy_of_the_old_03.png").resolve())
    torch.testing.assert_close(search.embeddings[copy], truth([photos / "copy_of_the_old_03.png"])[0], atol=1e-3,
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
    loaded = fresh.search("a red circle", top_k=3)
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

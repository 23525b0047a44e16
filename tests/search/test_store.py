"""The index file (liteclip.search.store): a crash at any moment keeps a whole index, a rebuild replaces the old
index in one step, files of the user's are never written or deleted, and a damaged file is one named error."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liteclip.errors import InputError, ModelLoadError
from liteclip.pipeline import ZeroShotPipeline
from liteclip.search import image_search as image_search_module
from liteclip.search import store
from liteclip.search.image_search import ImageSearch
from tests.conftest import draw_image


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    for i in range(12):
        draw_image(folder / f"{i:02d}.png", (20 * i, 255 - 20 * i, (70 * i) % 255), size=32 + i)
    return folder


def loaded(model_dir: Path, index_path: Path) -> dict[str, list[float]]:
    """id -> embedding of what a fresh load of the index holds."""
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.load(index_path)
    return dict(zip(search.ids, search.embeddings.tolist()))


def test_a_kill_inside_the_final_transaction_keeps_the_previous_index_and_the_next_run_finishes(model_dir, photos,
                                                                                                tmp_path):
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, chunk_size=4, show_progress=False)
    before = loaded(model_dir, index_path)
    for name in ("00.png", "05.png", "10.png"):
        (photos / name).unlink()
    draw_image(photos / "new.png", (1, 2, 3), size=40)
    # SIGKILL once the end of the run has rewritten a chunk inside its transaction: no Python cleanup runs
    script = textwrap.dedent(f"""
        import os, signal
        from liteclip.pipeline import ZeroShotPipeline
        from liteclip.search import store
        from liteclip.search.image_search import ImageSearch

        original_finish = store.IndexFile.finish

        def finish(self, live, duplicates):
            store.pack_paths = lambda paths: os.kill(os.getpid(), signal.SIGKILL)
            original_finish(self, live, duplicates)

        store.IndexFile.finish = finish
        ImageSearch(ZeroShotPipeline({str(model_dir)!r})).index({str(photos)!r}, {str(index_path)!r},
                                                                 chunk_size=4, show_progress=False)
        """)
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    after_kill = loaded(model_dir, index_path)  # the journal SQLite left is rolled back: nothing half written
    assert {key: after_kill[key] for key in before} == before and len(after_kill) == 13  # + the committed new one
    search = ImageSearch(ZeroShotPipeline(model_dir))
    assert search.index(photos, index_path, show_progress=False) == 0  # the new photo's chunk was committed
    assert set(loaded(model_dir, index_path)) == set(search.ids) and len(search) == 10


def test_a_rebuild_for_another_model_keeps_the_old_index_whole_until_it_replaces_it(model_dir, photos, tmp_path,
                                                                                   monkeypatch):
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, show_progress=False)
    old_bytes = index_path.read_bytes()
    monkeypatch.setattr(image_search_module, "model_fingerprint", lambda model_dir: "another-model-000")
    real, calls = image_search_module.encode_decodable_image_files, []

    def crash_on_second_chunk(model, paths, *args, **kwargs):
        calls.append(len(paths))
        if len(calls) == 2:
            raise KeyboardInterrupt("stopped")
        return real(model, paths, *args, **kwargs)

    monkeypatch.setattr(image_search_module, "encode_decodable_image_files", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, chunk_size=5, show_progress=False)
    assert index_path.read_bytes() == old_bytes  # the old model's index still serves, untouched
    assert store.building_path(index_path).is_file()
    monkeypatch.setattr(image_search_module, "encode_decodable_image_files", real)
    rebuilt = ImageSearch(ZeroShotPipeline(model_dir))
    assert rebuilt.index(photos, index_path, chunk_size=5, show_progress=False) == 7  # the first chunk is kept
    assert not store.building_path(index_path).exists()
    index_file = store.IndexFile.open(index_path)
    assert index_file.fingerprint == "another-model-000" and index_file.row_count() == 12
    index_file.close()


@pytest.mark.parametrize("rebuild", [True, False])
def test_a_file_of_the_users_at_the_rebuild_name_is_never_written_or_deleted(model_dir, photos, tmp_path,
                                                                            monkeypatch, rebuild):
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, show_progress=False)
    old_bytes = index_path.read_bytes()
    users = store.building_path(index_path)
    users.write_text("a note of mine that happens to have this name")
    if rebuild:  # another model's index must be rebuilt beside itself, where the user's file is
        monkeypatch.setattr(image_search_module, "model_fingerprint", lambda model_dir: "another-model-000")
        with pytest.raises(InputError, match=r"\.photos\.index\.building exists and is not a liteclip search index"):
            ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, show_progress=False)
        assert index_path.read_bytes() == old_bytes
    else:  # updated in place: the user's file is not in the way, and stays
        draw_image(photos / "new.png", (1, 2, 3))
        assert ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, show_progress=False) == 1
    assert users.read_text() == "a note of mine that happens to have this name"


def test_a_file_name_that_is_not_utf8_is_kept_byte_for_byte(model_dir, photos, tmp_path):
    odd = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not UTF-8, as old cameras and archives name files
    draw_image(photos / odd, (200, 10, 10))
    index_path = tmp_path / "photos.index"
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, index_path, show_progress=False)
    again = ImageSearch(ZeroShotPipeline(model_dir))
    again.load(index_path)
    assert (photos / odd).resolve() in again.paths
    assert os.fsencode(again.search("red", top_k=13)[0][0].name) in {os.fsencode(p.name) for p in again.paths}


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    """An index file of 6 rows over two chunks, written by IndexFile itself."""
    path = tmp_path_factory.mktemp("store") / "photos.index"
    index_file = store.IndexFile.create(path, "fingerprint-0000", 4)
    for start in (0, 3):
        index_file.append([f"{start + i:064x}" for i in range(3)], [f"/photos/{start + i}.jpg" for i in range(3)],
                          [[10, 20]] * 3, torch.randn(3, 4).numpy())
    index_file.close()
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(min_value=0, max_value=1 << 16), garbage=st.binary(min_size=1, max_size=64))
def test_a_damaged_index_file_is_one_named_error_never_a_traceback(small_index, tmp_path, offset, garbage):
    path = tmp_path / "damaged.index"
    data = bytearray(small_index)
    offset %= len(data)
    data[offset:offset + len(garbage)] = garbage
    path.write_bytes(bytes(data))
    try:
        index_file = store.IndexFile.open(path)
        try:
            for _, chunk in index_file.chunks():
                assert len(chunk.sha256) == len(chunk.paths) == chunk.embeddings.shape[0]
            index_file.duplicates()
        finally:
            index_file.close()
    except ModelLoadError as error:
        assert "damaged.index" in str(error) and "\n" not in str(error)

"""The index file (liteclip.search.store): a crash at any moment keeps a whole index, a rebuild replaces the old
index in one step, files of the user's are never written or deleted, and a damaged file is one named error."""

import contextlib
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
from tests.search.conftest import stop_encoding_at_chunk


def loaded(model_dir: Path, index_path: Path) -> dict[str, list[float]]:
    """id -> embedding of what a fresh load of the index holds."""
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.load(index_path)
    return dict(zip(search.ids, search.embeddings.tolist()))


@pytest.mark.parametrize("deleted", [3, 8])
def test_a_kill_inside_the_final_transaction_keeps_the_previous_index_and_the_next_run_finishes(model_dir, photos,
                                                                                                tmp_path, deleted):
    """3 of 12 photos gone: the end of the run records the changes; 8: it rewrites the chunks (over a quarter)."""
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, chunk_size=4, show_progress=False)
    before = loaded(model_dir, index_path)
    for name in sorted(path.name for path in photos.iterdir())[:deleted]:
        (photos / name).unlink()
    draw_image(photos / "new.png", (1, 2, 3), size=40)
    # SIGKILL right after the first write inside the run's last transaction: no Python cleanup runs
    script = textwrap.dedent(f"""
        import os, signal
        from liteclip.pipeline import ZeroShotPipeline
        from liteclip.search import store
        from liteclip.search.image_search import ImageSearch

        class KilledAfterFirstWrite:
            def __init__(self, connection):
                self.connection = connection
            def __getattr__(self, name):
                return getattr(self.connection, name)
            def __enter__(self):
                return self.connection.__enter__()
            def __exit__(self, *exc):
                return self.connection.__exit__(*exc)
            def _write(self, method, sql, *args):
                result = getattr(self.connection, method)(sql, *args)
                if sql.startswith(("INSERT INTO changes", "UPDATE chunks", "DELETE FROM chunks")):
                    os.kill(os.getpid(), signal.SIGKILL)
                return result
            def execute(self, sql, *args):
                return self._write("execute", sql, *args)
            def executemany(self, sql, *args):
                return self._write("executemany", sql, *args)

        original_finish = store.IndexFile.finish

        def finish(self, live, duplicates):
            self.connection = KilledAfterFirstWrite(self.connection)
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
    assert loaded(model_dir, index_path) == dict(zip(search.ids, search.embeddings.tolist()))
    assert len(search) == 13 - deleted


def test_an_update_records_what_changed_and_rewrites_chunks_only_once_changes_pile_up(model_dir, photos, tmp_path):
    import sqlite3

    index_path = tmp_path / "photos.index"
    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, index_path, chunk_size=4, show_progress=False)

    def table(name):
        with contextlib.closing(sqlite3.connect(index_path)) as connection:
            return connection.execute(f"SELECT * FROM {name}").fetchall()

    written = {number: blob for number, *_, blob in table("chunks")}
    (photos / "01.png").unlink()  # one row removed
    (photos / "02.png").rename(photos / "moved.png")  # one row standing for another file
    search.index(photos, index_path, chunk_size=4, show_progress=False)
    changes = table("changes")
    assert sorted((number, position, path is None) for number, position, path, *_ in changes) == [(1, 1, True),
                                                                                                   (1, 2, False)]
    assert {number: blob for number, *_, blob in table("chunks")} == written  # no chunk written again
    assert set(loaded(model_dir, index_path)) == set(search.ids) and len(search) == 11
    assert (photos / "moved.png").resolve() in search.paths
    for name in ("03.png", "04.png"):  # 1 + 2 + 1 changes of 12 rows: over a quarter, rewritten
        (photos / name).unlink()
    search.index(photos, index_path, chunk_size=4, show_progress=False)
    assert table("changes") == [] and sum(count for _, count, *_ in table("chunks")) == 9
    reloaded = ImageSearch(ZeroShotPipeline(model_dir))
    reloaded.load(index_path)
    assert sorted(zip(reloaded.ids, reloaded.paths)) == sorted(zip(search.ids, search.paths))


def test_a_rebuild_for_another_model_keeps_the_old_index_whole_until_it_replaces_it(model_dir, photos, tmp_path,
                                                                                   monkeypatch):
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, show_progress=False)
    old_bytes = index_path.read_bytes()
    monkeypatch.setattr(image_search_module, "model_fingerprint", lambda model_dir: "another-model-000")
    real = stop_encoding_at_chunk(monkeypatch, 2)
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
    """An index file of 6 rows over two chunks, one removed since (a row of its changes table) and a duplicate,
    written by IndexFile itself."""
    path = tmp_path_factory.mktemp("store") / "photos.index"
    index_file = store.IndexFile.create(path, "fingerprint-0000", 4)
    for start in (0, 3):
        index_file.append([f"{start + i:064x}" for i in range(3)], [f"/photos/{start + i}.jpg" for i in range(3)],
                          [[10, 20]] * 3, torch.nn.functional.normalize(torch.randn(3, 4), dim=-1).numpy())
    live = {f"{i:064x}": (f"/photos/{i}.jpg", [10, 20]) for i in range(1, 6)}  # row 0 removed: a change recorded
    index_file.finish(live, [("/photos/copy.jpg", f"{1:064x}", [10, 20])])
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


def test_the_small_index_reads_back_whole_with_its_change_applied(small_index, tmp_path):
    path = tmp_path / "photos.index"
    path.write_bytes(small_index)
    index_file = store.IndexFile.open(path)
    rows = [sha for _, chunk in index_file.chunks() for sha in chunk.sha256]
    assert rows == [f"{i:064x}" for i in range(1, 6)] and [p for p, _, _ in index_file.duplicates()] == [
        "/photos/copy.jpg"]
    index_file.close()


# ------------------------------------------------------------------------------ review of issue 43: messy input


@pytest.fixture
def built(model_dir, photos, tmp_path):
    index_path = tmp_path / "photos.index"
    ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, chunk_size=5, show_progress=False)
    return index_path


HOSTILE_EDITS = {
    "a count of a trillion": "UPDATE chunks SET count = 1000000000000 WHERE chunk = 1",
    "a negative count": "UPDATE chunks SET count = -5 WHERE chunk = 1",
    "no embedding width": "DELETE FROM meta WHERE key = 'dim'",
    "a width that is text": "UPDATE meta SET value = 'wide' WHERE key = 'dim'",
    "an embedding width of 0": "UPDATE meta SET value = '0' WHERE key = 'dim'",
    "a narrower embedding width": "UPDATE meta SET value = '8' WHERE key = 'dim'",
    "paths that are a number": "UPDATE chunks SET paths = 7 WHERE chunk = 1",
    "hashes that are text": "UPDATE chunks SET sha256 = hex(sha256) WHERE chunk = 1",
    "embeddings cut short": "UPDATE chunks SET embeddings = substr(embeddings, 1, 100) WHERE chunk = 1",
    "NaN embeddings": "UPDATE chunks SET embeddings = zeroblob(length(embeddings)) WHERE chunk = 1",
    "a change at position -1": "INSERT INTO changes VALUES (1, -1, CAST('/etc/passwd' AS BLOB), 1, 1)",
    "a change that is text": "INSERT INTO changes VALUES (1, 'x', NULL, NULL, NULL)",
    "chunks that are a view": "ALTER TABLE chunks RENAME TO c2; CREATE VIEW chunks AS SELECT * FROM c2",
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_EDITS))
def test_a_hostile_or_damaged_index_is_one_line_for_search_and_index_and_is_left_as_it_was(model_dir, photos, built,
                                                                                           capsys, edit):
    """Review of issue 43: hand-made SQLite files gave tracebacks, asked for terabytes, or loaded NaN rows that
    ranked first; `index` reported success over a damaged file that `search` then refused."""
    import sqlite3

    from liteclip.cli import main

    with contextlib.closing(sqlite3.connect(built)) as connection:
        connection.executescript(HOSTILE_EDITS[edit])
        connection.commit()
    damaged = built.read_bytes()
    common = ["--index", str(built), "--model-dir", str(model_dir)]
    assert main(["search", "a red circle", *common]) == 2
    assert main(["index", str(photos), *common]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("photos.index" in line and "damaged" in line for line in errors)
    assert built.read_bytes() == damaged and not store.building_path(built).exists()


def test_an_index_of_the_first_version_of_this_format_without_its_changes_table_loads_and_updates(model_dir, photos,
                                                                                                  built):
    import sqlite3

    with contextlib.closing(sqlite3.connect(built)) as connection:
        connection.execute("DROP TABLE changes")
        connection.commit()
    before = loaded(model_dir, built)
    (photos / "00.png").unlink()
    search = ImageSearch(ZeroShotPipeline(model_dir))
    assert search.index(photos, built, show_progress=False) == 0 and len(search) == 11
    assert loaded(model_dir, built) == {key: value for key, value in before.items() if key in set(search.ids)}


@pytest.mark.parametrize("sidecar", ["photos.index-journal", "photos.index-wal"])
@pytest.mark.parametrize("command", ["index", "search", "index a new one"])
def test_a_file_of_the_users_named_like_sqlites_journal_is_never_read_or_deleted(model_dir, photos, tmp_path, built,
                                                                                 capsys, sidecar, command):
    """Review of issue 43: SQLite takes PATH-journal and PATH-wal for its own and deleted a user's note there."""
    from liteclip.cli import main

    index_path = built if command != "index a new one" else tmp_path / "new.index"
    note = index_path.with_name(index_path.name + sidecar[len("photos.index"):])
    note.write_text("my notes, whatever their name")
    before = built.read_bytes()
    argv = ["search", "a red circle"] if command == "search" else ["index", str(photos)]
    assert main([*argv, "--index", str(index_path), "--model-dir", str(model_dir)]) == 2
    assert "is not SQLite's journal of the index" in capsys.readouterr().err
    assert note.read_text() == "my notes, whatever their name" and built.read_bytes() == before
    assert not (tmp_path / "new.index").exists()


def test_a_full_disk_is_one_line_and_keeps_what_was_committed(model_dir, photos, tmp_path, monkeypatch, capsys):
    import sqlite3

    from liteclip.cli import main

    original = store.IndexFile.append
    appended = []

    def full_at_the_second_chunk(self, *args):
        appended.append(1)
        if len(appended) == 2:
            real = self.connection

            class Full:  # SQLite's own error, from inside the transaction
                def __enter__(self):
                    return real.__enter__()

                def __exit__(self, *exc):
                    return real.__exit__(*exc)

                def execute(self, *_):
                    raise sqlite3.OperationalError("database or disk is full")

            self.connection = Full()
            try:
                return original(self, *args)
            finally:
                self.connection = real
        return original(self, *args)

    monkeypatch.setattr(store.IndexFile, "append", full_at_the_second_chunk)
    index_path = tmp_path / "photos.index"
    assert main(["index", str(photos), "--index", str(index_path), "--model-dir", str(model_dir),
                 "--chunk-size", "5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line, no traceback
    assert error.startswith("liteclip index: error: cannot write the search index")
    assert "database or disk is full" in error and "keeps what was committed" in error
    assert len(loaded(model_dir, index_path)) == 5  # the first chunk
    monkeypatch.setattr(store.IndexFile, "append", original)
    assert ImageSearch(ZeroShotPipeline(model_dir)).index(photos, index_path, show_progress=False) == 7


def test_a_search_whose_images_are_all_gone_says_so_in_one_line(model_dir, photos, built, capsys):
    import shutil

    from liteclip.cli import main

    shutil.move(photos, photos.with_name("moved"))
    assert main(["search", "a red circle", "--index", str(built), "--model-dir", str(model_dir)]) == 2
    assert "none of the images in" in capsys.readouterr().err


def test_paths_and_print0_write_names_that_are_not_utf8_byte_for_byte(model_dir, photos, tmp_path, capsysbinary):
    from liteclip.cli import main

    odd = os.fsdecode(b"caf\xe9.png")
    draw_image(photos / odd, (250, 0, 0), size=40)
    index_path = tmp_path / "photos.index"
    common = ["--index", str(index_path), "--model-dir", str(model_dir)]
    assert main(["index", str(photos), *common]) == 0
    capsysbinary.readouterr()
    for flag, end in (("--print0", b"\0"), ("--paths", b"\n")):
        assert main(["search", "red", "--top-k", "13", flag, *common]) == 0
        out = capsysbinary.readouterr().out
        assert os.fsencode(photos.resolve() / odd) + end in out and out.count(end) == 13


OLDER_FORMAT_EDITS = {
    "rows that are not a list": lambda meta: meta.update(files=5),
    "a row without a path": lambda meta: meta["files"][0].pop("path"),
    "a path that is a number": lambda meta: meta["files"][0].update(path=7),
    "a stamp of 10^30": lambda meta: meta["files"][0].update(stamp=[10 ** 30, 1]),
    "a hash that is not hex": lambda meta: meta["files"][0].update(sha256="z" * 64),
    "a duplicate that is a number": lambda meta: meta["files"][0].update(duplicates=[3]),
    "one row too many": lambda meta: meta["files"].append(dict(meta["files"][0], path="/x.png")),
}


@pytest.mark.parametrize("edit", sorted(OLDER_FORMAT_EDITS))
def test_a_damaged_index_of_the_older_format_is_one_line_for_search_and_index(model_dir, photos, tmp_path, capsys,
                                                                              edit):
    import hashlib
    import json

    from safetensors.torch import save_file

    from liteclip.cli import main

    search = ImageSearch(ZeroShotPipeline(model_dir))
    search.index(photos, show_progress=False)
    files = [{"path": str(path), "stamp": [path.stat().st_size, path.stat().st_mtime_ns],
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()} for path in search.paths]
    meta = {"model": search.fingerprint, "files": files}
    OLDER_FORMAT_EDITS[edit](meta)
    index_path = tmp_path / "photos.index"
    save_file({"embeddings": search.embeddings.contiguous()}, str(index_path),
              metadata={"liteclip_index": json.dumps(meta)})
    common = ["--index", str(index_path), "--model-dir", str(model_dir)]
    assert main(["search", "a red circle", *common]) == 2 and main(["index", str(photos), *common]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("photos.index" in line for line in errors)
    assert not store.building_path(index_path).exists()

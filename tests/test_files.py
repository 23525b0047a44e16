"""File I/O that survives a crash and touches only its own files: atomic writes with ordinary modes, links, and
folders written beside the user's files (write_directory)."""

import os

import pytest
import torch

from liteclip.files import atomic_link, atomic_write_bytes
from liteclip.train.run_directory import load_checkpoint, save_checkpoint
from tests.user_files import assert_user_files_untouched, plant_user_files, snapshot


def test_atomic_write_replaces_whole_file(tmp_path):
    atomic_write_bytes(tmp_path / "f", b"old contents")
    atomic_write_bytes(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"new"


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_kept_checkpoint_stays_as_it_was_when_its_source_is_saved_again(tmp_path, monkeypatch, hard_links):
    def no_links(*args):  # a file system without them: an atomic copy instead
        raise OSError("hard links are not supported here")

    if not hard_links:
        monkeypatch.setattr(os, "link", no_links)
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1, "w": torch.ones(4)})
    atomic_link(tmp_path / "last.pt", tmp_path / "best.pt")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "best.pt") == hard_links
    save_checkpoint(tmp_path / "last.pt", {"epoch": 2, "w": torch.zeros(4)})
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    atomic_link(tmp_path / "last.pt", tmp_path / "best.pt")  # over an existing best
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # nothing staged left behind


# ------------------------------------------------------------------------- file modes and damaged files (issue 26)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path):
    return oct(path.stat().st_mode & 0o777)


def test_atomic_writes_give_the_modes_an_ordinary_write_would(tmp_path, umask_022):
    atomic_write_bytes(tmp_path / "new.yaml", b"x")
    (tmp_path / "plain.yaml").write_bytes(b"x")  # the reference: what open(..., "w") gives under this umask
    assert mode(tmp_path / "new.yaml") == mode(tmp_path / "plain.yaml") == oct(0o644)
    (tmp_path / "private.pt").write_bytes(b"old")
    (tmp_path / "private.pt").chmod(0o600)
    save_checkpoint(tmp_path / "private.pt", {"step": 1})  # a file the user made private stays private
    assert mode(tmp_path / "private.pt") == oct(0o600)
    os.umask(0o077)
    atomic_write_bytes(tmp_path / "strict.yaml", b"x")
    assert mode(tmp_path / "strict.yaml") == oct(0o600)


def test_a_saved_model_a_run_directory_and_an_index_are_readable_by_others(model_dir, tiny_config, tmp_path,
                                                                           umask_022):
    from liteclip import build_model
    from liteclip.pipeline import ZeroShotPipeline
    from liteclip.search.image_search import ImageSearch
    from liteclip.train.run_directory import RunDirectory
    from tests.conftest import draw_image

    build_model(tiny_config.model).save_pretrained(tmp_path / "saved")
    assert mode(tmp_path / "saved") == oct(0o755)
    assert {mode(p) for p in (tmp_path / "saved").rglob("*") if p.is_file()} == {oct(0o644)}
    run = RunDirectory(tmp_path / "run")
    run.prepare(tiny_config)
    run.write_final_metrics({"test_mean_recall": 1.0})
    assert mode(tmp_path / "run" / "config.yaml") == mode(tmp_path / "run" / "final_metrics.csv") == oct(0o644)
    draw_image(tmp_path / "photos" / "a.png", (1, 2, 3))
    ImageSearch(ZeroShotPipeline(model_dir, device="cpu")).index(tmp_path / "photos", tmp_path / "p.index",
                                                                  show_progress=False)
    assert {mode(p) for p in tmp_path.glob("p.index*")} == {oct(0o644)}


# ------------------------------------------------------------------ a folder writer touches only its own files


def written_by(files: dict[str, bytes]):
    """A write_contents that makes these files (a name with a slash makes its folder)."""
    def write_contents(staging):
        for name, data in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
    return write_contents


OWNED = {"weights.bin", "config.json", "tokenizer"}
FIRST = {"weights.bin": b"first", "config.json": b"{}", "tokenizer/vocab.txt": b"a b"}
SECOND = {"weights.bin": b"second", "config.json": b"{\"v\": 2}", "tokenizer/vocab.txt": b"c d"}


def test_a_new_folder_appears_whole_with_a_manifest_of_what_liteclip_wrote(tmp_path):
    from liteclip.files import MANIFEST_NAME, write_directory, written_names

    out = write_directory(tmp_path / "new" / "out", written_by(FIRST), "the test export", OWNED)
    assert (out / "weights.bin").read_bytes() == b"first" and (out / "tokenizer" / "vocab.txt").read_bytes() == b"a b"
    assert written_names(out) == OWNED and sorted(p.name for p in out.iterdir()) == sorted(OWNED | {MANIFEST_NAME})
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging folder left beside it


def test_writing_into_a_folder_of_the_users_files_keeps_every_one_of_them_and_replaces_only_its_own(tmp_path):
    from liteclip.files import write_directory

    out = tmp_path / "photos"
    before = plant_user_files(out)
    write_directory(out, written_by(FIRST), "the test export", OWNED)
    assert_user_files_untouched(out, before)
    write_directory(out, written_by(SECOND), "the test export", OWNED)  # its own earlier files: replaced
    assert_user_files_untouched(out, before)
    assert (out / "weights.bin").read_bytes() == b"second" and (out / "tokenizer" / "vocab.txt").read_bytes() == b"c d"
    assert not [p for p in out.iterdir() if p.name.startswith(".liteclip-staging")]


def test_a_path_through_dot_dot_writes_where_the_kernel_says_and_moves_none_of_the_users_files(tmp_path):
    """Issue 38: `--out victim/inner/..` moved the victim's files into a staging folder and deleted it on an error."""
    from liteclip.files import write_directory

    victim = tmp_path / "victim"
    (victim / "inner").mkdir(parents=True)
    before = plant_user_files(victim)
    write_directory(victim / "inner" / "..", written_by(FIRST), "the test export", OWNED)
    assert_user_files_untouched(victim, before)
    assert (victim / "weights.bin").read_bytes() == b"first"


@pytest.mark.parametrize("theirs", ["config.json", "tokenizer"])
def test_a_file_of_the_same_name_the_user_made_is_refused_and_nothing_is_written(tmp_path, theirs):
    from liteclip.files import write_directory
    from liteclip.errors import InputError

    out = tmp_path / "mine"
    before = plant_user_files(out, names=(theirs,))
    with pytest.raises(InputError, match=f"already holds {theirs}, which liteclip did not write"):
        write_directory(out, written_by(FIRST), "the test export", OWNED)
    assert_user_files_untouched(out, before, exactly=True)


@pytest.mark.parametrize("failing_rename", [1, 2, 4])
def test_an_error_midway_leaves_the_folder_exactly_as_it_was_found(tmp_path, monkeypatch, failing_rename):
    from liteclip import files
    from liteclip.files import write_directory

    out = tmp_path / "out"
    plant_user_files(out)
    write_directory(out, written_by(FIRST), "the test export", OWNED)  # an earlier export of its own, to replace
    before = snapshot(out)
    real_rename, calls = os.rename, []

    def rename(source, target):
        calls.append(source)
        if len(calls) == failing_rename:
            raise OSError(28, "No space left on device")
        return real_rename(source, target)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        write_directory(out, written_by(SECOND), "the test export", OWNED)
    monkeypatch.undo()
    assert_user_files_untouched(out, before, exactly=True)  # the earlier export's files included


@pytest.mark.parametrize("when", ["while staging", "while swapping"])
def test_a_process_killed_midway_leaves_the_users_files_as_they_were(tmp_path, when):
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "out"
    plant_user_files(out)
    from liteclip.files import write_directory

    write_directory(out, written_by({"weights.bin": b"an earlier export"}), "the test export", {"weights.bin"})
    before = snapshot(out)
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from liteclip import files

        def write_contents(staging):
            (staging / "weights.bin").write_bytes(b"new")
            (staging / "config.json").write_bytes(b"{{}}")
            if {when!r} == "while staging":
                os.kill(os.getpid(), signal.SIGKILL)

        real_rename = os.rename
        def rename(source, target):
            real_rename(source, target)
            if Path(target).name == "config.json":  # one entry in, the next not yet
                os.kill(os.getpid(), signal.SIGKILL)
        files.os.rename = rename
        files.write_directory(sys.argv[1], write_contents, "the test export", {{"weights.bin", "config.json"}})
    """)
    process = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True)
    assert process.returncode == -9, process.stderr.decode()
    after = snapshot(out)
    theirs = [name for name in before if name not in ("weights.bin", ".liteclip-written.json")]
    assert {name: after.get(name) for name in theirs} == {name: before[name] for name in theirs}
    assert after["weights.bin"][1] in (b"an earlier export", b"new")  # its own file: old or new, never torn


def test_a_folder_an_older_liteclip_wrote_without_a_manifest_is_recognised_by_the_writers_rule(tmp_path):
    from liteclip.files import write_directory

    out = tmp_path / "old"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"old")
    (out / "config.json").write_bytes(b'{"exported_by": "liteclip"}')
    (out / "notes.txt").write_text("mine")
    older = lambda directory, name: b"liteclip" in (directory / "config.json").read_bytes()  # noqa: E731
    write_directory(out, written_by(FIRST), "the test export", OWNED, owns=older)
    assert (out / "weights.bin").read_bytes() == b"first" and (out / "notes.txt").read_text() == "mine"


def test_a_file_the_user_put_inside_one_of_its_folders_is_refused_not_deleted_with_the_folder(tmp_path):
    """Review of issue 38: a re-export swapped tokenizer/ whole and deleted the user's note inside it."""
    from liteclip.files import write_directory
    from liteclip.errors import InputError

    out = tmp_path / "out"
    write_directory(out, written_by(FIRST), "the test export", OWNED)
    (out / "tokenizer" / "my_notes.txt").write_text("mine")
    (out / "tokenizer" / "mine").mkdir()
    before = snapshot(out)
    with pytest.raises(InputError, match=r"tokenizer/mine, tokenizer/my_notes.txt, which liteclip did not write"):
        write_directory(out, written_by(SECOND), "the test export", OWNED)
    assert_user_files_untouched(out, before, exactly=True)


def test_a_file_of_the_same_name_made_while_the_new_contents_are_written_is_refused_not_replaced(tmp_path):
    """Review of issue 38: the check ran only before staging, so a file made during a slow export was replaced."""
    from liteclip.files import write_directory
    from liteclip.errors import InputError

    out = tmp_path / "out"
    plant_user_files(out)

    def slow_writer(staging):
        written_by(FIRST)(staging)
        (out / "config.json").write_text('{"my": "precious"}')  # the user, meanwhile

    with pytest.raises(InputError, match="already holds config.json"):
        write_directory(out, slow_writer, "the test export", OWNED)
    assert (out / "config.json").read_text() == '{"my": "precious"}'
    assert not [p for p in out.iterdir() if p.name.startswith(".liteclip")]


def test_a_folder_an_older_liteclip_wrote_may_hold_only_what_the_new_contents_hold(tmp_path):
    from liteclip.files import write_directory
    from liteclip.errors import InputError

    out = tmp_path / "old"
    (out / "tokenizer").mkdir(parents=True)
    (out / "weights.bin").write_bytes(b"old")
    (out / "config.json").write_bytes(b"liteclip")
    (out / "tokenizer" / "vocab.txt").write_text("old vocab")
    (out / "tokenizer" / "added_by_me.txt").write_text("mine")
    older = lambda directory, name: True  # noqa: E731  (recognised as an older liteclip's folder)
    with pytest.raises(InputError, match="tokenizer/added_by_me.txt"):
        write_directory(out, written_by(FIRST), "the test export", OWNED, owns=older)
    assert (out / "tokenizer" / "added_by_me.txt").read_text() == "mine"
    (out / "tokenizer" / "added_by_me.txt").unlink()
    write_directory(out, written_by(FIRST), "the test export", OWNED, owns=older)
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a b"


def test_an_output_that_is_a_link_to_nowhere_is_refused_rather_than_created_where_it_points(tmp_path):
    from liteclip.errors import InputError
    from liteclip.files import write_directory

    (tmp_path / "out").symlink_to(tmp_path / "elsewhere" / "deep" / "folder")
    with pytest.raises(InputError, match="is a link to .* which does not exist"):
        write_directory(tmp_path / "out", written_by(FIRST), "the test export", OWNED)
    assert not (tmp_path / "elsewhere").exists()

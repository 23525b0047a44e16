import os
import pickle

import pytest
import torch

from liteclip.checkpoint import ModelLoadError, atomic_link, atomic_write_bytes, load_checkpoint, save_checkpoint


class Payload:
    """A pickle that runs code when unpickled: it would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_round_trip_of_a_plain_training_state(tmp_path):
    state = {"model": {"w": torch.randn(3, 3)}, "step": 7, "best_metric": 1.5, "config": {"a": [1, 2]}}
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload(marker)}, path)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_checkpoint(path)
    assert not marker.exists()
    with open(tmp_path / "raw.pkl", "wb") as handle:
        pickle.dump(Payload(marker), handle)
    with pytest.raises(ModelLoadError):
        load_checkpoint(tmp_path / "raw.pkl")
    assert not marker.exists()


def test_crash_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(4)})

    def crash(fd):
        raise OSError("disk pulled out mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="mid-write"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(4)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


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
    from liteclip.pipeline import ImageSearch, ZeroShotPipeline
    from liteclip.run_directory import RunDirectory
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


def test_a_truncated_checkpoint_is_called_truncated_not_a_pickle(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.randn(64, 64)}, "step": 3})
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"last.pt is truncated or damaged \(.*\)\. .*best.pt") as error:
        load_checkpoint(tmp_path / "last.pt")
    assert "pickle" not in str(error.value) and "safetensors" not in str(error.value)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"empty.pt is truncated or damaged \(0 bytes"):
        load_checkpoint(tmp_path / "empty.pt")

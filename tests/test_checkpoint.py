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

"""The run directory: logs that keep every column whatever the first row held and trim exactly on resume, and
training checkpoints that load without running code and survive a crash."""

import csv
import os
import pickle
import shutil

import pytest
import torch

from liteclip.errors import DiskSpaceError, LiteclipError, ModelLoadError, RunInUseError
from liteclip.train.run_directory import (CsvLog, RunDirectory, check_writable, checkpoint_bytes, load_checkpoint,
                                          save_checkpoint)


def read(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_a_key_that_first_appears_later_widens_the_header(tmp_path):
    log = CsvLog(tmp_path / "epochs.csv")
    log({"epoch": 1, "step": 10, "train_loss": 2.5})
    log({"epoch": 2, "step": 20, "train_loss": 2.0, "val_loss": 1.5, "mean_recall": 40.0})
    log({"epoch": 3, "step": 30, "train_loss": 1.8})
    fields, rows = read(tmp_path / "epochs.csv")
    assert fields == ["epoch", "step", "train_loss", "val_loss", "mean_recall"]
    assert [r["val_loss"] for r in rows] == ["", "1.5", ""]
    assert [r["train_loss"] for r in rows] == ["2.5", "2.0", "1.8"]


def test_resume_trims_rows_past_the_checkpoint_and_keeps_the_widened_header(tmp_path):
    path = tmp_path / "epochs.csv"
    log = CsvLog(path)
    for step in (10, 20, 30):
        log({"epoch": step // 10, "step": step, "loss": 1.0, **({"val_loss": 0.5} if step == 20 else {})})
    resumed = CsvLog(path, resume_step=20)
    resumed({"epoch": 3, "step": 30, "loss": 0.9})
    fields, rows = read(path)
    assert fields == ["epoch", "step", "loss", "val_loss"]
    assert [(r["step"], r["loss"], r["val_loss"]) for r in rows] == [("10", "1.0", ""), ("20", "1.0", "0.5"),
                                                                      ("30", "0.9", "")]
    CsvLog(path)  # a fresh run in the same directory starts a fresh log
    assert path.read_text() == ""


def test_resume_auto_without_a_checkpoint_starts_fresh_and_a_named_one_must_exist(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert run.resume_path(None) is None and run.resume_path("auto") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        run.resume_path(str(tmp_path / "nowhere.pt"))


def test_an_unwritable_directory_is_a_liteclip_error_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LiteclipError, match=f"cannot write to {blocker / 'run'}"):
        check_writable(blocker / "run")


HOLDER = """
import sys, time
from liteclip.train.run_directory import RunDirectory
with RunDirectory(sys.argv[1]).locked():
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_run_directory_in_use_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path,
                                                                                                     caplog):
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"in use by process {holder.pid} on"):
            with RunDirectory(tmp_path / "run").locked():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level("WARNING"):
        with RunDirectory(tmp_path / "run").locked():
            assert f"process {os.getpid()} on" in (tmp_path / "run" / ".liteclip.lock").read_text()
    assert f"left locked by process {holder.pid}" in caplog.text
    assert (tmp_path / "run" / ".liteclip.lock").read_text() == ""  # a clean exit leaves no holder


def test_free_space_is_checked_against_the_runs_real_checkpoint_size(tmp_path, monkeypatch):
    import torch

    from liteclip.train.run_directory import save_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(4, 300)).sum().backward()
    optimizer.step()  # the moments exist from here on
    checkpoint_size, model_size = checkpoint_bytes(model, optimizer)
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    actual = (tmp_path / "c.pt").stat().st_size
    assert actual * 0.9 < checkpoint_size < actual * 1.1
    assert model_size == sum(t.numel() * 4 for t in model.state_dict().values())

    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    need = 3 * checkpoint_size + 2 * model_size  # run and model directory on one disk here
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, need - 1))
    with pytest.raises(DiskSpaceError, match=f"{run.path}.* MiB free, this run needs about"):
        run.check_free_space(tmp_path / "model", checkpoint_size, model_size)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, need))
    run.check_free_space(tmp_path / "model", checkpoint_size, model_size)


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    from liteclip.files import atomic_write_bytes

    target = tmp_path / "last.pt"
    atomic_write_bytes(target, b"the previous checkpoint")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=f"cannot write {target} .*No space left on device; the previous file is kept"):
        atomic_write_bytes(target, b"x" * 1000)
    assert target.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


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

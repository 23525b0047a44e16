"""The run directory's logs: every column kept whatever the first row held, and exact trimming on resume."""

import csv

import pytest

from liteclip.errors import LiteclipError
from liteclip.run_directory import CsvLog, RunDirectory, check_writable


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

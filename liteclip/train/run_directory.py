"""A training run's folder (`train.output_dir`): what is written there, how a run resumes from it, and the checks
made before any training starts.

    config.yaml          the resolved config
    config.until_step_N.yaml   the config a run used before it was resumed at step N with changed settings
    metrics.csv          one row every train.log_every optimiser steps: loss, lr, samples/s
    epochs.csv           one row per epoch: train loss, and validation loss and recall on evaluation epochs
    tensorboard/         the same rows, when the tensorboard package is installed
    .liteclip.lock       held by the training process while it runs: a second run on the directory fails at once
    last.pt, best.pt     training checkpoints (weights, optimiser, RNG, progress, config), written atomically
    final_metrics.csv    the best model on the test split

The logs keep every column whatever the first row held (a row with a new key widens the header), and a resumed
run trims them back to its checkpoint's step, so no step is missing or logged twice.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import pickle
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from liteclip.config import Config
from liteclip.errors import ConfigError, DiskSpaceError, ModelLoadError, OutputDirectoryError, RunInUseError
from liteclip.files import atomic_link, atomic_write_bytes, load_weights
from liteclip.train.ema import WeightAverage

logger = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"
LOCK_NAME = ".liteclip.lock"
# what a run writes in its folder: in a folder no run has used (no lock file), a file of one of these names is the
# user's, and the run is refused rather than write over it
RUN_FILES = ("config.yaml", "metrics.csv", "epochs.csv", "final_metrics.csv", LAST, BEST, "tensorboard")


@dataclass
class TrainState:
    """A run's progress, saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    best_metric: float = -math.inf
    best_epoch: int = -1
    # a checkpoint written inside an epoch also holds where the epoch and its current log window stood, so a run
    # resumed from it logs and averages exactly as an uninterrupted one (liteclip.train.preemption)
    epoch_step: int = 0  # optimiser steps done in the unfinished epoch
    epoch_loss_sum: float = 0.0
    window_loss_sum: float = 0.0
    window_steps: int = 0
    window_samples: int = 0
    # streaming shards: where each reader stands in the unfinished epoch, "rank:worker" -> position (ShardStream)
    stream_shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    # what train.precision resolved to when the run started ("bf16", "fp16", "fp32"): where auto is measured
    # (liteclip.precision), a resumed run keeps it, as a measurement can come out otherwise on a busy machine
    precision: str = ""

    def start_epoch(self) -> None:
        self.epoch_step, self.epoch_loss_sum = 0, 0.0
        self.window_loss_sum, self.window_steps, self.window_samples = 0.0, 0, 0
        self.stream_shards = {}


# --------------------------------------------------------------------------------------------------------- logs


class CsvLog:
    """Appends rows to a CSV, flushing each.

    A row with a key the header lacks widens the header (the file is rewritten atomically, once per new column);
    rows without a value leave the cell empty. On resume, rows past the resumed step are dropped so none repeat; a
    fresh run starts a fresh log.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        self.fields: list[str] = []
        rows: list[dict[str, str]] = []
        if path.is_file() and resume_step is not None:
            rows, self.fields = self._read()
            rows = [row for row in rows if int(row["step"]) <= resume_step]
        self._rewrite(rows)

    def _read(self) -> tuple[list[dict[str, str]], list[str]]:
        with open(self.path, newline="") as handle:
            reader = csv.DictReader(handle)
            return list(reader), list(reader.fieldnames or [])

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        if self.fields:
            writer = csv.DictWriter(text, fieldnames=self.fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        atomic_write_bytes(self.path, text.getvalue().encode())

    def rows(self) -> list[dict[str, str]]:
        """The rows written so far, as text."""
        return self._read()[0] if self.fields else []

    def __call__(self, row: dict[str, Any]) -> None:
        new_fields = [key for key in row if key not in self.fields]
        if new_fields:
            rows = self._read()[0] if self.fields else []
            self.fields += new_fields
            self._rewrite(rows)
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, restval="").writerow(row)
            handle.flush()


class TensorBoardLog:
    """Mirrors logged rows to TensorBoard when the tensorboard package is installed; a no-op otherwise."""

    def __init__(self, directory: Path, prefix: str):
        self.prefix = prefix
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
        else:
            self.writer = SummaryWriter(str(directory))

    def __call__(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{self.prefix}/{key}", value, row["step"])
        self.writer.flush()


def format_metrics(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------------ the directory


class RunDirectory:
    """The files of one run; only the main process of a run writes them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.step_log: CsvLog | None = None
        self.epoch_log: CsvLog | None = None
        self.boards: dict[str, TensorBoardLog] = {}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the run directory for this process while inside.

        A second training on the same directory fails at once, naming the process that holds it. The lock is the
        kernel's (flock), released when its process ends however it ends, so a killed run's lock is simply taken
        over by the next run. Where flock is missing (Windows) or does not span machines (some network file
        systems), runs are not locked.
        """
        refuse_a_folder_of_other_files(self.path)
        check_writable(self.path)
        try:
            import fcntl
        except ImportError:
            yield
            return
        with os.fdopen(os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644), "r+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = handle.read().strip() or "another process"
                raise RunInUseError(f"{self.path} is in use by {holder}; wait for that run to end or stop it, or "
                                    f"set another train.output_dir") from None
            left_by = handle.read().strip()
            if left_by:
                logger.warning("%s was left locked by %s, which has ended; taking it over", self.path, left_by)
            _rewrite(handle, f"process {os.getpid()} on {socket.gethostname()} (started {time.strftime('%c')})")
            try:
                yield
            finally:
                _rewrite(handle, "")  # a clean exit leaves no holder behind; closing releases the flock

    def prepare(self, config: Config, resume_path: Path | None = None) -> None:
        """Compares the config with the checkpoint being resumed, if any (a change it cannot resume with is an
        error, before anything is written), checks that the run and model directories can take checkpoints, then
        writes config.yaml; a resumed run's earlier config, if it changed, is kept as config.until_step_N.yaml."""
        replaced = replaced_config(resume_path, config)
        model_dir = Path(config.train.model_dir)
        for directory in (self.path, model_dir.parent):
            check_writable(directory)
        remove_stale_temporaries(self.path)
        if replaced is not None:
            step, old = replaced
            atomic_write_bytes(self.path / f"config.until_step_{step}.yaml",
                               yaml.safe_dump(old, sort_keys=False).encode())
        atomic_write_bytes(self.path / "config.yaml", config.to_yaml().encode())

    def check_free_space(self, model_dir: Path, checkpoint_size: int, model_size: int) -> None:
        """Fails before training if the disks cannot take the run's checkpoints and the exported model."""
        needs: dict[Path, int] = {self.path: 3 * checkpoint_size, model_dir.parent: 2 * model_size}
        by_disk: dict[int, list[Path]] = {}
        for directory in needs:
            by_disk.setdefault(directory.stat().st_dev, []).append(directory)
        for directories in by_disk.values():
            need = sum(needs[d] for d in directories)
            free = shutil.disk_usage(directories[0]).free
            if free < need:
                raise DiskSpaceError(
                    f"{' and '.join(map(str, directories))}: {free / 2**20:.0f} MiB free, this run needs about "
                    f"{need / 2**20:.0f} MiB (three {checkpoint_size / 2**20:.0f} MiB checkpoints in "
                    f"{self.path}: last, best and one being written; the exported model twice while it is "
                    f"replaced). Free some space or set another train.output_dir / train.model_dir.")

    def resume_path(self, resume: str | None) -> Path | None:
        """None, "auto" (this run's last checkpoint, if any) or a checkpoint file or run directory -> a checkpoint."""
        if resume is None:
            return None
        if resume == "auto":
            path = self.path / LAST
            return path if path.is_file() else None
        path = Path(resume)
        if path.is_dir():
            path = path / LAST
        if not path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path}")
        return path

    def open_logs(self, resume_step: int | None) -> None:
        self.step_log = CsvLog(self.path / "metrics.csv", resume_step)
        self.epoch_log = CsvLog(self.path / "epochs.csv", resume_step)
        self.boards = {name: TensorBoardLog(self.path / "tensorboard", name) for name in ("train", "val")}

    def log_step(self, row: dict[str, Any]) -> None:
        self.step_log(row)
        self.boards["train"](row)

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.epoch_log(row)
        self.boards["val"](row)
        logger.info("epoch %d: %s", row["epoch"], format_metrics(row))

    def epoch_rows(self) -> list[dict[str, str]]:
        return self.epoch_log.rows()

    def save(self, name: str, state: dict[str, Any]) -> None:
        save_checkpoint(self.path / name, state)

    def keep_as(self, name: str, saved: str) -> None:
        """`name` becomes the checkpoint saved as `saved` (best.pt as the last.pt just written) without writing it
        again."""
        atomic_link(self.path / saved, self.path / name)

    def write_final_metrics(self, metrics: dict[str, float]) -> None:
        text = "metric,value\n" + "".join(f"{k},{v}\n" for k, v in metrics.items())
        atomic_write_bytes(self.path / "final_metrics.csv", text.encode())
        logger.info("test: %s", format_metrics(metrics))


def check_writable(directory: Path) -> None:
    """Fails before training, not after an hour, if a directory cannot take a checkpoint."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 1024)
        probe.unlink()
    except OSError as error:
        raise OutputDirectoryError(f"cannot write to {directory} ({error.strerror}); choose another "
                                   f"train.output_dir / train.model_dir or free some space") from None


def _rewrite(handle: Any, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


def checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of a training checkpoint, bytes of the model's weights): weights plus Adam's two moments per
    trainable parameter, which exist from the first step on."""
    model_size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])
    return model_size + 2 * trainable, model_size


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a run killed in the middle of a write left (atomic_write_bytes names them .NAME.XXXX.tmp):
    only those of the run's own files, never a finished file, never anything else."""
    for name in (*RUN_FILES, "config.until_step_*.yaml"):
        for stale in directory.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def refuse_a_folder_of_other_files(directory: Path) -> None:
    """An OutputDirectoryError when `directory` holds files of the names a run writes but no run has used it (no
    lock file): they are someone else's, and a run would write over them."""
    if not directory.is_dir() or (directory / LOCK_NAME).exists():
        return
    theirs = [name for name in RUN_FILES if os.path.lexists(directory / name)]
    if theirs:
        raise OutputDirectoryError(f"train.output_dir {directory} holds {', '.join(theirs)}, which no liteclip run "
                                   f"wrote there; a run writes files of those names. Choose a new folder for "
                                   f"train.output_dir (nothing was written)")


# ------------------------------------------------------------------------------------------------------- resume


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Writes a training checkpoint (tensors, numbers, strings, dicts and lists only) atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a training checkpoint without running any code it may carry."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused an object; its own messages are many and deep
        raise ModelLoadError(
            f"refused to load {path}: it is not a plain-tensor checkpoint that loads with weights_only=True "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). liteclip never unpickles arbitrary "
            f"objects; re-export the weights as safetensors.") from None
    except Exception as error:  # a cut zip archive, an empty file, bytes that are no checkpoint at all
        reason = ": ".join(filter(None, [type(error).__name__, *str(error).split(". ")[:1]]))[:160]
        raise ModelLoadError(
            f"{path} is truncated or damaged ({path.stat().st_size:,} bytes; {reason}). Checkpoints are written "
            f"whole, so it was cut or changed afterwards (a full disk while copying, a partial download): resume "
            f"from another copy, or from best.pt beside it (--resume RUN_DIR/best.pt).") from None



def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler | None, state: TrainState, config: Config,
                     rng_per_rank: list[torch.Tensor] | None = None, ema: WeightAverage | None = None
                     ) -> dict[str, Any]:
    """Everything a run needs to continue exactly: weights, optimiser, scaler, weight average, progress, RNG and
    the config.

    rng_per_rank: every rank's torch RNG state, for a checkpoint inside an epoch (at an epoch's start each rank
    reseeds from (seed, epoch, rank) anyway).
    """
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "ema": ema.averaged.state_dict() if ema is not None else {},
        **dataclasses.asdict(state),
        "rng": {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "torch_per_rank": rng_per_rank or []},
        "config": config.to_dict(),
    }


# what a checkpoint cannot be resumed under when it changes: the weights' shapes and which of them train (the
# optimiser's state is per trainable tensor), and whether a weight average is kept
UNRESUMABLE = ("model.", "train.ema_decay")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and key != "model_kwargs":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resumed_config_changes(saved: dict[str, Any], config: Config, path: Path) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between a checkpoint's config and the one resuming it, {key: (saved, now)}.

    A change the checkpoint cannot be resumed under (UNRESUMABLE) is a ConfigError naming every such key; the
    others are logged as a warning, key by key, and take effect from the resumed step."""
    before, now = flatten(saved), flatten(config.to_dict())
    changes = {key: (before[key], now[key]) for key in now if key in before and before[key] != now[key]}
    fatal = {key: change for key, change in changes.items() if key.startswith(UNRESUMABLE)
             and not (key == "train.ema_decay" and None not in change)}
    if fatal:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in fatal.items())
        raise ConfigError(f"cannot resume {path} under a changed model or weight average ({listed}); resume it with "
                          f"the config it was trained with ({path.parent / 'config.yaml'}), or start a new run with "
                          f"another train.output_dir")
    if changes:
        logger.warning("resuming %s with changed settings, which take effect from its step on: %s", path,
                       "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()))
    return changes


def restore(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, state: TrainState, rank: int = 0,
            ema: WeightAverage | None = None) -> None:
    """Loads a checkpoint written by checkpoint_state into the model, optimiser, scaler and state."""
    checkpoint = load_checkpoint(path)
    load_weights(model, checkpoint["model"], str(path))
    # the config's learning rates, weight decay, betas and eps win over the checkpoint's (a resumed run may change
    # them: resumed_config_changes warns), while the moments and step counts come from the checkpoint
    configured = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None:
        if not checkpoint.get("ema"):
            raise ModelLoadError(f"{path} holds no weight average; resume it without train.ema_decay, or start anew")
        ema.averaged.load_state_dict(checkpoint["ema"])
    for progress in dataclasses.fields(state):
        if progress.name in checkpoint:  # checkpoints from before mid-epoch saving lack the epoch_* fields
            setattr(state, progress.name, checkpoint[progress.name])
    per_rank = checkpoint["rng"].get("torch_per_rank") or []
    torch.set_rng_state(per_rank[rank] if rank < len(per_rank) else checkpoint["rng"]["torch"])
    if checkpoint["rng"].get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    logger.info("resumed from %s at epoch %d, step %d%s", path, state.epoch, state.step,
                f" ({state.epoch_step} steps into epoch {state.epoch + 1})" if state.epoch_step else "")


def replaced_config(resume_path: Path | None, config: Config) -> tuple[int, dict] | None:
    """(step, config) of the checkpoint being resumed when its config differs from `config` (see
    resumed_config_changes: an unresumable change is an error), else None."""
    if resume_path is None:
        return None
    checkpoint = load_checkpoint(resume_path)
    saved = checkpoint.get("config") or {}
    return (checkpoint.get("step", 0), saved) if resumed_config_changes(saved, config, resume_path) else None

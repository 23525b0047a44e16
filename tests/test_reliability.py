"""Fault tests: a run killed with SIGKILL loses nothing, a checkpoint write killed half-way leaves the previous one,
and memory stays flat over many steps."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.functional import pad

from liteclip.checkpoint import load_checkpoint, save_checkpoint
from liteclip.optim import build_optimizer
from liteclip.runtime import keep_freed_memory
from liteclip.training import contrastive_step, optimizer_step
from tests.test_training import FP32, fixed_batches, read_rows, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def train_command(tmp_path, run_name, resume=False):
    overrides = tiny_overrides(tmp_path, "data.demo_num_images=120", "train.epochs=3",
                               f"train.output_dir={tmp_path / run_name}", f"train.model_dir={tmp_path / run_name}_model")
    return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/demo.yaml"), "--no-progress",
            *(["--resume", "auto"] if resume else []), "--set", *overrides]


def run_to_end(command):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def test_sigkill_mid_epoch_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    run_to_end(train_command(tmp_path, "straight"))
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    steps_per_epoch = straight["step"] // 3

    process = subprocess.Popen(train_command(tmp_path, "killed"), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.csv"
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        rows = read_rows(metrics) if metrics.is_file() else []
        if rows and int(rows[-1]["step"]) >= steps_per_epoch + 2:  # inside the second epoch
            process.send_signal(signal.SIGKILL)
            killed_at = int(rows[-1]["step"])
            break
        time.sleep(0.02)
    process.wait()
    assert killed_at is not None and killed_at < 2 * steps_per_epoch, "the run was not killed mid-epoch"
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 1

    run_to_end(train_command(tmp_path, "killed", resume=True))
    resumed = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert resumed["step"] == straight["step"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    steps = [int(r["step"]) for r in read_rows(metrics)]
    assert steps == list(range(1, straight["step"] + 1))  # none missing, none twice
    assert [r["loss"] for r in read_rows(metrics)] == [r["loss"] for r in read_rows(tmp_path / "straight" / "metrics.csv")]


WRITER = """
import sys, torch
from liteclip.checkpoint import save_checkpoint
save_checkpoint(sys.argv[1], {"step": 2, "w": torch.zeros(150_000_000)})  # 600 MB: slow enough to be caught
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        temporary = list(tmp_path.glob(".last.pt.*.tmp"))
        if temporary and temporary[0].stat().st_size > 0:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["w"], torch.ones(3))


def resident_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def test_memory_stays_flat_over_many_steps(tmp_path):
    config = tiny_config(tmp_path)
    model, (batch,) = fixed_batches(config, 1, 8)
    model.train()
    optimizer = build_optimizer(model, config.optim)
    losses = torch.zeros(())
    with keep_freed_memory():  # as fit runs on the CPU: freed memory is kept, so growth would show
        for step in range(300):
            # dynamic padding gives every batch its own length: varied block sizes must not fragment the heap
            padded = {**batch, "input_ids": pad(batch["input_ids"], (0, step % 7)),
                      "attention_mask": pad(batch["attention_mask"], (0, step % 7))}
            losses += contrastive_step(model, [padded], FP32, None)  # the trainer keeps a detached running sum
            optimizer_step(model, optimizer, None, 1.0)
            if step == 49:
                baseline = resident_mib()
    growth = resident_mib() - baseline
    assert growth < 40, f"resident memory grew by {growth:.1f} MiB over 250 steps"
    assert not losses.requires_grad

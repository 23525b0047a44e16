"""Fault tests: a run killed with SIGKILL loses nothing, a checkpoint write killed half-way leaves the previous one,
and memory stays flat over many steps."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn.functional import pad

from liteclip.train.run_directory import load_checkpoint, save_checkpoint
from liteclip.train.optim import build_optimizer
from liteclip.runtime import keep_freed_memory
from liteclip.train.loop import contrastive_step, optimizer_step
from tests.train.test_loop import FP32, fixed_batches, read_rows, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def train_command(tmp_path, run_name, resume=False):
    # one precision for every run compared: `auto` times bf16 against fp32 on some CPUs (AVX-512 BF16 without AMX),
    # and two separate processes could each decide differently if the machine is busy (resume keeps the started one)
    overrides = tiny_overrides(tmp_path, "data.demo_num_images=120", "train.epochs=3", "train.precision=fp32",
                               f"train.output_dir={tmp_path / run_name}",
                               f"train.model_dir={tmp_path / run_name}_model")
    return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/demo.yaml"), "--no-progress",
            *(["--resume", "auto"] if resume else []), "--set", *overrides]


def run_to_end(command):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of 3 epochs: (its directory, its last checkpoint)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    run_to_end(train_command(tmp_path, "straight"))
    return tmp_path / "straight", load_checkpoint(tmp_path / "straight" / "last.pt")


def signal_mid_epoch(command, metrics, steps_per_epoch, sig, after=2):
    """Starts the run, sends `sig` once the log shows step steps_per_epoch + after; returns (step seen, process)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = None
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        rows = read_rows(metrics) if metrics.is_file() else []
        if rows and int(rows[-1]["step"]) >= steps_per_epoch + after:  # inside the second epoch
            process.send_signal(sig)
            seen = int(rows[-1]["step"])
            break
        time.sleep(0.02)
    process.wait(timeout=300)
    assert seen is not None and seen < 2 * steps_per_epoch, "the run was not signalled mid-epoch"
    return seen, process


def assert_resumes_like_the_uninterrupted_run(tmp_path, run_name, straight, *extra):
    straight_dir, straight_last = straight
    run_to_end(train_command(tmp_path, run_name, resume=True) + list(extra))
    resumed = load_checkpoint(tmp_path / run_name / "last.pt")
    assert resumed["step"] == straight_last["step"]
    for name, tensor in straight_last["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    metrics = read_rows(tmp_path / run_name / "metrics.csv")
    assert [int(r["step"]) for r in metrics] == list(range(1, straight_last["step"] + 1))  # none missing or twice
    assert [r["loss"] for r in metrics] == [r["loss"] for r in read_rows(straight_dir / "metrics.csv")]
    epochs = read_rows(tmp_path / run_name / "epochs.csv")
    assert [r["train_loss"] for r in epochs] == [r["train_loss"] for r in read_rows(straight_dir / "epochs.csv")]


def test_sigkill_mid_epoch_then_resume_auto_matches_an_uninterrupted_run(tmp_path, straight):
    steps_per_epoch = straight[1]["step"] // 3
    signal_mid_epoch(train_command(tmp_path, "killed"), tmp_path / "killed" / "metrics.csv", steps_per_epoch,
                     signal.SIGKILL)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 1
    assert_resumes_like_the_uninterrupted_run(tmp_path, "killed", straight)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_writes_a_checkpoint_and_resume_is_exact(tmp_path, straight, sig):
    steps_per_epoch = straight[1]["step"] // 3
    seen, process = signal_mid_epoch(train_command(tmp_path, "stopped"), tmp_path / "stopped" / "metrics.csv",
                                     steps_per_epoch, sig)
    assert process.returncode == 128 + sig, process.stderr.read()[-2000:]
    message = process.stderr.read()
    assert f"checkpoint written to {tmp_path / 'stopped' / 'last.pt'}" in message and "--resume auto" in message
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert stopped["epoch"] == 1 and stopped["epoch_step"] > 0 and stopped["step"] >= seen  # inside epoch 2
    assert_resumes_like_the_uninterrupted_run(tmp_path, "stopped", straight)


def test_sigkill_between_two_mid_epoch_checkpoints_then_resume_is_exact(tmp_path, straight):
    steps_per_epoch = straight[1]["step"] // 3
    every_step = "train.checkpoint_every_minutes=0.0001"  # 6 ms: a checkpoint after nearly every step
    signal_mid_epoch(train_command(tmp_path, "killed") + [every_step], tmp_path / "killed" / "metrics.csv",
                     steps_per_epoch, signal.SIGKILL, after=4)
    last = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert last["epoch"] == 1 and last["epoch_step"] > 0  # the kill came after a mid-epoch checkpoint
    assert_resumes_like_the_uninterrupted_run(tmp_path, "killed", straight, every_step)


WRITER = """
import sys, torch
from liteclip.train.run_directory import save_checkpoint
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


def test_sigkill_resume_with_a_weight_average_ends_bit_identical(tmp_path):
    ema = "train.ema_decay=0.9"
    run_to_end(train_command(tmp_path, "straight_ema") + [ema])
    straight = (tmp_path / "straight_ema", load_checkpoint(tmp_path / "straight_ema" / "last.pt"))
    every_step = "train.checkpoint_every_minutes=0.0001"
    signal_mid_epoch(train_command(tmp_path, "killed") + [ema, every_step], tmp_path / "killed" / "metrics.csv",
                     straight[1]["step"] // 3, signal.SIGKILL, after=3)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["ema"]  # the average is in the checkpoint
    assert_resumes_like_the_uninterrupted_run(tmp_path, "killed", straight, ema, every_step)
    resumed = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert straight[1]["ema"].keys() == resumed["ema"].keys()
    for name, tensor in straight[1]["ema"].items():
        assert torch.equal(tensor, resumed["ema"][name]), name


def torchrun_command(tmp_path, run_name, resume=False):
    """train_command under torchrun: 2 processes on this machine, a gloo group on a free port."""
    command = train_command(tmp_path, run_name, resume)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command[1:],
            "train.device=cpu"]


def test_two_processes_stopped_mid_epoch_by_torchrun_resume_like_an_uninterrupted_pair(tmp_path):
    run_to_end(torchrun_command(tmp_path, "straight"))
    straight_last = load_checkpoint(tmp_path / "straight" / "last.pt")
    steps_per_epoch = straight_last["step"] // 3
    # SIGTERM to the torchrun agent, as a scheduler's preemption sends it: the agent passes it to both ranks, which
    # agree on the step to stop after and write one checkpoint
    signal_mid_epoch(torchrun_command(tmp_path, "stopped"), tmp_path / "stopped" / "metrics.csv", steps_per_epoch,
                     signal.SIGTERM)
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert stopped["epoch"] == 1 and stopped["epoch_step"] > 0
    run_to_end(torchrun_command(tmp_path, "stopped", resume=True))
    resumed = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert resumed["step"] == straight_last["step"]
    for name, tensor in straight_last["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    metrics = read_rows(tmp_path / "stopped" / "metrics.csv")
    assert [int(r["step"]) for r in metrics] == list(range(1, straight_last["step"] + 1))
    assert [r["loss"] for r in metrics] == [r["loss"] for r in read_rows(tmp_path / "straight" / "metrics.csv")]

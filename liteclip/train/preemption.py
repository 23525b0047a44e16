"""Stopping a run without losing it: checkpoints inside an epoch, and a clean stop on SIGTERM or SIGINT.

SLURM, Kubernetes and cloud spot machines send SIGTERM before they take a machine away; Ctrl-C sends SIGINT. Either
makes training finish the optimiser step it is in, write a checkpoint and stop with TrainingStopped, which names the
checkpoint; `--resume auto` continues from it exactly. A second Ctrl-C stops at once (KeyboardInterrupt). Inside a
long epoch, a checkpoint is also written every `train.checkpoint_every_minutes`, so a crash or a SIGKILL costs
minutes, not the epoch.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

from liteclip import distributed
from liteclip.errors import LiteclipError

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(LiteclipError):
    """Training stopped on a signal after writing a checkpoint; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class StepCheckpoints:
    """After each optimiser step, says whether to write a checkpoint now and whether to stop after it.

    Every rank asks at the same step and gets the same answer (distributed.any_rank), so under DDP all ranks
    checkpoint and stop together even if only one of them got the signal or the clock said so.
    """

    def __init__(self, every_minutes: float | None):
        self.interval_s = every_minutes * 60 if every_minutes else None
        self.last_written = time.monotonic()
        self.signal_name: str | None = None

    def check(self) -> tuple[bool, bool]:
        """(write a checkpoint now, stop after writing it)."""
        timer = self.interval_s is not None and time.monotonic() - self.last_written >= self.interval_s
        stop = self.signal_name is not None
        write, stop = distributed.any_rank(timer or stop, stop)
        return write, stop

    def written(self) -> None:
        self.last_written = time.monotonic()

    @contextlib.contextmanager
    def catching_stop_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT request a stop instead of killing the process, while inside (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread; a stop signal then acts as usual
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _request_stop(self, signum: int, frame: object) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, writing a checkpoint, then stopping (Ctrl-C again to "
                       "stop at once)", self.signal_name)

    def stop_error(self, checkpoint: str, step: int) -> TrainingStopped:
        signum = getattr(signal, self.signal_name or "SIGTERM")
        return TrainingStopped(f"training stopped by {self.signal_name} after optimiser step {step}; checkpoint "
                               f"written to {checkpoint}. Continue with --resume auto (same config and overrides).",
                               exit_code=128 + int(signum))

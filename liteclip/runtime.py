"""Process-wide speed settings, switched on around heavy work (a training run, batched image encoding) and off
again after it; never on import.

Why the CPU allocator matters: glibc serves every block above 32 MiB with its own mmap and unmaps it again on free.
Most activations of a 224 px batch are that large, so each training step faults gigabytes back in page by page and
the kernel zeroes every page, a large share of the step on a small VM where faults are dear (`python -m
benchmarks.train_throughput --without keep_cpu_memory` measures it; benchmarks/README.md has the figures).
keep_freed_memory() tells glibc to serve large blocks from its heap and keep what is
freed for the next step, as PyTorch's caching allocator does on CUDA and as jemalloc or tcmalloc (Intel's advice
for CPU training) do when preloaded. The price is a higher resident peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# mallopt parameters and glibc's defaults (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
INT_MAX = 2**31 - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None  # macOS, Windows and musl allocate differently; nothing to tune here
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname on the common Linux architectures
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_lock = threading.Lock()
_holders = 0  # nested and concurrent users: the outermost one applies and restores
_applied = False


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """While inside, freed memory stays in the process for reuse instead of going back to the OS.

    Yields whether the setting took effect (False off glibc). Nesting is fine (training calls the batched image
    encoder, which asks too): the outermost exit brings glibc's defaults back and releases the kept memory, so a
    notebook that trained does not hold the training peak afterwards. Allocations made by other threads keep
    working: glibc still maps blocks too large for a thread's own arena.
    """
    global _holders, _applied
    libc = _glibc()
    with _lock:
        if _holders == 0 and libc is not None:
            _applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
            if not _applied:
                logger.debug("glibc refused the allocator settings; memory is returned to the OS as usual")
        _holders += 1
        applied = _applied
    try:
        yield applied
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and libc is not None:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
                _applied = False


def keep_freed_memory_for(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """keep_freed_memory() around batched work on the CPU; nothing for an accelerator, whose allocator caches."""
    return keep_freed_memory() if enabled and device.type == "cpu" else contextlib.nullcontext()

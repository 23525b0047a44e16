import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

from liteclip.runtime import keep_freed_memory, keep_freed_memory_for

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def page_faults_of_a_repeated_large_allocation() -> int:
    """Minor page faults taken by allocating and filling 256 MiB right after the same size was freed; the fewest
    of three tries, since a process's first large blocks may still come from a fresh heap segment."""
    faults = []
    for _ in range(3):
        torch.ones(2**26).sum()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(2**26).sum()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults)


def in_a_fresh_process(check_name: str) -> None:
    """Runs one of the checks below in a new interpreter: whether glibc can keep a 256 MiB block depends on the
    address space that earlier allocations left (in a pytest process after hundreds of tests, now and then it
    could not), and what is tested here is the setting, not that history."""
    result = subprocess.run([sys.executable, "-c", f"from tests.test_runtime import {check_name}; {check_name}()"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_keep_freed_memory_reuses_large_blocks_and_restores_the_default_on_exit():
    in_a_fresh_process("check_kept_and_restored")


def check_kept_and_restored() -> None:
    default = page_faults_of_a_repeated_large_allocation()
    with keep_freed_memory() as applied:
        kept = page_faults_of_a_repeated_large_allocation()
    restored = page_faults_of_a_repeated_large_allocation()
    assert applied == GLIBC
    if GLIBC:
        # by default glibc unmaps the freed block and the second allocation faults every page in again
        assert default > 1000, default
        assert kept < default / 20, (kept, default)
        assert restored > default / 2, (restored, default)


def test_keep_freed_memory_for_applies_only_to_enabled_cpu_work():
    with keep_freed_memory_for(torch.device("cpu")) as applied:
        assert applied == GLIBC
    for device, enabled in ((torch.device("cpu"), False), (torch.device("cuda"), True), (torch.device("meta"), True)):
        with keep_freed_memory_for(device, enabled) as applied:
            assert applied is None  # nothing was touched


def test_a_nested_exit_leaves_the_outer_setting_in_place():
    in_a_fresh_process("check_nested_exit")


def check_nested_exit() -> None:
    with keep_freed_memory() as outer:
        with keep_freed_memory() as inner:  # training calls the batched image encoder, which asks again
            assert inner == outer == GLIBC
        still_kept = page_faults_of_a_repeated_large_allocation()
    restored = page_faults_of_a_repeated_large_allocation()
    if GLIBC:
        assert still_kept < 100 < restored, (still_kept, restored)

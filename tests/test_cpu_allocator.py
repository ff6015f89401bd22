"""`tune_cpu_allocator`: large freed CPU blocks are reused instead of faulted in anew (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from pole_hf.cpu_allocator import tune_cpu_allocator

FAULTS = """
import resource, sys, torch
from pole_hf.cpu_allocator import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else None
torch.empty(12_000_000).fill_(1.0)  # the first 48 MB block: faulted in either way
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.empty(12_000_000).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings")
def test_tuned_allocator_reuses_large_blocks_instead_of_faulting_them_in():
    _, default = page_faults("default")
    applied, tuned = page_faults("tuned")
    assert applied == "True"
    assert default > 8 * 10_000  # each fresh 48 MB block: ~11,700 new 4 KiB pages
    assert tuned < default / 3  # at most the heap growing once more


def test_a_threshold_below_glibcs_default_is_refused():
    with pytest.raises(ValueError, match="keep_bytes=4096"):
        tune_cpu_allocator(4096)

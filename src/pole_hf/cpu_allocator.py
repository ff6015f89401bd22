"""Reuse of freed CPU memory for CAM runs on the CPU (glibc's malloc settings).

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves every block above its mmap threshold (at most
32 MiB by default) with fresh pages from the kernel and returns them on free, so each large tensor of a CAM run (the
batched backward's ``[labels, tokens, 4 * width]`` activations: 9.4 MiB per label at 500x375 for ViT-B/16) is
faulted in and zeroed anew: about 70 MiB of new pages per label, 0.3-0.4 CPU s of kernel time for 5 labels at
500x375 (measured with `resource.getrusage`). A caching allocator (jemalloc, tcmalloc, as PyTorch's CPU tuning
guide suggests) avoids that; [`tune_cpu_allocator`] gets the same from glibc by keeping large blocks on its heap.
It changes the whole process, so the library never calls it by itself: `examples/generate_cams.py` and the CLI do
(their process is theirs), and a user's program may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30
"""Blocks up to this size come from glibc's heap, and up to this much freed memory stays there for reuse."""


def tune_cpu_allocator(keep_bytes: int = KEEP_BYTES) -> bool:
    """Make glibc's `malloc` keep freed blocks up to `keep_bytes` for reuse instead of unmapping them.

    Peak memory is unchanged (a block is reused, not added); the process keeps up to `keep_bytes` of freed memory
    instead of returning it to the system at once.

    Args:
        keep_bytes: mmap and trim threshold in bytes (at least 128 KiB, glibc's default threshold).

    Returns:
        `True` when applied, `False` where the C library is not glibc (macOS, Windows, musl): nothing changes there.
    """
    if keep_bytes < 128 * 1024:
        raise ValueError(f"keep_bytes={keep_bytes} is below glibc's default threshold of 128 KiB: give a larger size")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, keep_bytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, keep_bytes))


__all__ = ["tune_cpu_allocator"]

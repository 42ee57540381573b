"""Host memory for CPU compute: keep freed memory in the process instead of handing it back to the kernel.

glibc serves an allocation above a threshold (128 KiB, rising with use to at most 32 MiB) with its own `mmap` and
unmaps it on free, and gives the top of its heap back to the kernel once 128 KiB of it are free; either way the
next tensor of that size starts as fresh pages, each of which faults and is zeroed on first touch. A training step
on a CPU makes and frees the same large tensors (a layer's activations and scores) over and over, and those faults
cost about as much as the arithmetic on them. `keep_freed_memory` sets the mapping threshold to glibc's largest,
32 MiB, and the trim threshold to 2 GiB (mallopt): blocks up to 32 MiB come from the heap and stay there for reuse.
Larger ones are still mapped: serving those from the heap too (M_MMAP_MAX = 0) was as fast but fragmented the heap,
+0.9 GiB of peak RSS on the default preset. On a GPU run the host holds little, so this is for CPU compute only
(benchmarks/train_throughput.py times a CPU run).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest: bigger blocks are still mapped, and unmapped when freed
_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve allocations up to 32 MiB from the heap and keep freed memory; False where the C
    library is not glibc (macOS, musl) or refuses, which changes nothing but speed."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied

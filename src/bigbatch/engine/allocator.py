"""The CPU memory allocator setting, which decides much of a CPU training step's time
(BENCHMARKS.md, "Numbers that were in docstrings").

glibc serves allocations above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh
`mmap` calls and returns them with `munmap` on free. A training step allocates and frees
activation and logit buffers of tens to hundreds of MiB every micro-step, so each step pays
to fault the same pages in again (a page fault and zeroing per 4 KiB). Telling glibc to serve
everything from its heap and never trim it keeps those pages mapped and reused. The price is
memory: freed memory is not given back to the OS until exit, and buffers of different sizes
fragment the heap, so peak RSS is higher (BENCHMARKS.md) and depends on
the allocation history. The memory planner's probes run with the same setting for that reason. jemalloc with decay disabled does the same, but needs LD_PRELOAD set before the
process starts; mallopt works from inside the running process, before the first big tensor.

Opt out with `train.allocator = "system"`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_glibc_malloc() -> bool:
    """Keep large freed buffers mapped for reuse. Returns False where glibc is not the libc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1  # no mmap-per-allocation: serve from the heap
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # never hand the heap top back
    return bool(ok)

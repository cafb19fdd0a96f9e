"""Process-level memory-allocator tuning for CPU runs (Linux with glibc only).

torch's CPU allocator hands every freed tensor back to glibc, and glibc serves large requests
(above its dynamic mmap threshold, at most 32 MiB) with fresh ``mmap`` calls. A simulated day
allocates and frees the same large tensors, so every day page-faults its whole working set in
again: at N = 10⁷ agents more than half of a run was kernel time. Raising glibc's mmap and
trim thresholds keeps freed memory in the heap for reuse — 4× the throughput at N = 10⁷ and
~1.2× at 10⁶ (docs/benchmarks.md) — at the price of the process keeping its peak memory
until it exits. The ``decentsim`` command applies it; library users may call it themselves.
Set ``DECENTSIM_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; returns whether the setting took effect."""
    if sys.platform != "linux" or os.environ.get("DECENTSIM_MALLOC_TUNING", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None)  # absent on musl
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _INT_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))

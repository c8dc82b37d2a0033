"""glibc malloc settings for training on the CPU: keep activation buffers in the process instead of returning
them to the kernel after every step.

Measured on the 2-core EPYC (bench/allocator.py, the demo recipe in fp32): with glibc's defaults every step
frees its activation buffers back to the kernel (buffers above the dynamic mmap threshold are unmapped, the
top of the heap is trimmed) and faults them in again on the next step — about 685k minor page faults and
1.6 s of system CPU per step. A fixed mmap threshold of 32 MiB (glibc's maximum) and
a trim threshold larger than any step keep those pages mapped: after the first step the run makes almost no
new faults. Peak RSS is unchanged (the heap already kept those pages at the peak), and the saved pages are
reused by the next step instead of being zeroed by the kernel again.

Applied once per process by the command line and by `train()`; a no-op outside glibc, when the user set
any MALLOC_* / GLIBC_TUNABLES malloc variable, or with LLM2EMB_MALLOC=system.
"""
from __future__ import annotations

import ctypes
import functools
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
# mallopt takes an int, but glibc stores the trim threshold as size_t without checking: -1 becomes SIZE_MAX,
# "never trim". (A large finite int would not do: once the free top of the heap passes the threshold, glibc
# returns all of it, not only the excess.)
NEVER_TRIM = -1
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_applied: bool | None = None


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> bool:
    """Set the thresholds (once per process); True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("LLM2EMB_MALLOC", "").lower() == "system":
        return False
    if any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user chose their own settings
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    logger.debug("malloc thresholds %s (mmap 32 MiB, no trimming)", "set" if _applied else "refused")
    return _applied


def release_freed_memory() -> bool:
    """Give memory that finished work freed back to the system: a garbage collection, then glibc's
    `malloc_trim(0)`. The thresholds above keep freed pages mapped for the next training step, which is what a
    training loop wants; a long job made of phases (a pipeline's stages, a teacher used once, evaluations)
    would otherwise carry the largest phase's pages as resident memory to its end. Call it between phases.
    True when the trim ran."""
    import gc

    gc.collect()
    if not _applied:
        return False
    try:
        trim = _libc().malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True

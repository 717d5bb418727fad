"""Host memory of a training run: its peak, a fresh peak window, the C heap's policy, and the size of Python
objects.

A training run frees a lot: a forward to layer L of 8,192 tokens allocates some 600 tensors over 1 MiB (about
100 MiB live at once), an SAE step a few dozen. Left to its defaults, glibc maps the largest of them afresh
and gives the heap's top back on free, so the same pages are zero-filled and faulted in again on the next
allocation: about a quarter of a CPU forward's time on SmolLM2. Kept instead, freed pages scatter over a
heap that longer-lived tensors have cut into holes, so one forward touches 2-4x the memory it holds, and
the steps' pages add up with the forward's. The streams (`train.buffer.BufferedStream`) therefore call
`tune_heap` (freed blocks under 32 MiB stay in the heap for reuse; the heap's top is not trimmed on free)
and hand the free pages back (`release_free_memory`, `malloc_trim`) once per phase: before a refill, so the
SAE steps' pages are not held while the model runs, and after it, so the model's are not held while the
SAEs train. Within a phase, freed blocks are reused without faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys


def peak_memory_mib() -> float:
    """Peak resident memory of this process (MiB), since it started or since `reset_peak_memory()`."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):  # not Linux: the process-lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_memory() -> bool:
    """Start a new peak-memory window (Linux `/proc/self/clear_refs`); False where that is unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    lib = ctypes.util.find_library("c")
    return ctypes.CDLL(lib) if lib else None


def _libc_function(name: str):
    """The C library's function `name`, or None where there is no such library or function."""
    return getattr(_libc(), name, None)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest: bigger blocks are always mapped afresh


@functools.cache
def tune_heap() -> None:
    """Once per process (glibc; a no-op elsewhere): freed blocks under 32 MiB stay in the heap for reuse and
    its top is not given back on free; `release_free_memory` gives free pages back when the caller chooses."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def resident_memory_mib() -> float | None:
    """Resident memory of this process now (MiB); None where /proc is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE_MIB
    except OSError:
        return None


_PAGE_MIB = resource.getpagesize() / 2**20


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`, all arenas; a no-op elsewhere).
    A trim costs a few milliseconds, and the pages given back are faulted in again when next used."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


def object_mib(root: object) -> float:
    """MiB the Python objects reachable from `root` through dicts, lists and tuples occupy (each once)."""
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total / 2**20

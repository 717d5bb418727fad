"""Host memory of a training run: its peak, a fresh peak window, and handing freed heap pages back.

Harvesting allocates tensors of changing shapes (one per forward batch); glibc keeps the freed pages in its
heap, so a long CPU run's resident memory creeps up well past what it holds. `release_free_memory` returns
them (`malloc_trim`) whenever resident memory has crept up; the stream calls it after each forward batch
and the trainer after each step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource


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
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def resident_memory_mib() -> float | None:
    """Resident memory of this process now (MiB); None where /proc is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * _PAGE_MIB
    except OSError:
        return None


_PAGE_MIB = resource.getpagesize() / 2**20
_SLACK_MIB = 64.0  # resident growth tolerated before trimming (a trim costs ~10 ms on a 1 GiB heap)
_after_last_trim: list[float] = [0.0]


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`; a no-op elsewhere) once
    resident memory has grown by more than 64 MiB since the last time, so frequent calls stay cheap."""
    trim, rss = _malloc_trim(), resident_memory_mib()
    if trim is None or rss is None or rss - _after_last_trim[0] < _SLACK_MIB:
        return
    trim(0)
    _after_last_trim[0] = resident_memory_mib() or 0.0

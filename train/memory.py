"""Host memory of a training run: its peak, a fresh peak window, handing freed heap pages back, and the size
of Python objects.

glibc keeps freed heap pages resident, and a training run frees a lot: a forward to layer L of 8,192 tokens
allocates some 600 tensors over 1 MiB (about 100 MiB live at once), an SAE step a few dozen. glibc's best
fit scatters them over a heap that longer-lived tensors have cut into holes, so one forward touches 2-4x
the memory it holds at once, and the steps' scattered pages add up with the forward's. The streams
(`train.buffer.BufferedStream`) therefore call `release_free_memory` (`malloc_trim`) at each change of
phase: before each harvesting step, so the SAE steps' freed pages are not held while the model runs, and
after a refill, so the model's are not held while the SAEs train.
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


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc `malloc_trim`, all arenas; a no-op elsewhere).
    A trim costs a few milliseconds, and the pages given back are faulted in again when next used."""
    trim = _malloc_trim()
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

"""Peak-memory windows and giving freed heap pages back (Linux / glibc, as on the CI machine)."""

from __future__ import annotations

import sys

import pytest
import torch

from train import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@linux
def test_reset_starts_a_new_peak_window():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    before = memory.peak_memory_mib()
    assert memory.reset_peak_memory()
    after = memory.peak_memory_mib()
    assert after < before - 32, "the freed 64 MiB no longer counts towards the new window's peak"


@linux
def test_release_gives_back_pages_held_by_a_pinned_heap(monkeypatch):
    chunks = [torch.ones(16 * 1024) for _ in range(8000)]  # 64 KiB each: heap, not mmap; ~500 MiB
    pin = torch.ones(16 * 1024)  # allocated last: keeps the heap top in use, so free() cannot shrink it
    del chunks
    held = memory.resident_memory_mib()
    monkeypatch.setattr(memory, "_after_last_trim", [0.0])
    memory.release_free_memory()
    assert memory.resident_memory_mib() < held - 256
    chunks = [torch.ones(16 * 1024) for _ in range(512)]  # 32 MiB more: less growth than a trim waits for
    pin_again = torch.ones(16 * 1024)
    del chunks
    held = memory.resident_memory_mib()
    memory.release_free_memory()
    assert memory.resident_memory_mib() > held - 16, "under 64 MiB of growth since the last trim: no trim"
    del pin, pin_again


def test_release_is_skipped_while_memory_has_not_grown(monkeypatch):
    monkeypatch.setattr(memory, "_after_last_trim", [float("inf")])
    memory.release_free_memory()  # nothing to do, and nothing raised
    assert memory._after_last_trim[0] == float("inf")

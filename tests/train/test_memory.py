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
def test_release_gives_back_pages_held_by_a_pinned_heap():
    chunks = [torch.ones(16 * 1024) for _ in range(8000)]  # 64 KiB each: heap, not mmap; ~500 MiB
    pin = torch.ones(16 * 1024)  # allocated last: keeps the heap top in use, so free() cannot shrink it
    del chunks
    held = memory.resident_memory_mib()
    memory.release_free_memory()
    assert memory.resident_memory_mib() < held - 256
    del pin


def test_object_size_counts_shared_objects_once():
    text = "x" * 100_000
    records = [[{"role": "user", "content": text}] for _ in range(10)]
    assert memory.object_mib(records) < 0.2, "ten records sharing one 100 kB string hold it once"
    records = [[{"role": "user", "content": "x" * 100_000 + str(i)}] for i in range(10)]
    assert 0.9 < memory.object_mib(records) < 1.1

"""Peak-memory windows, the tuned heap and giving freed heap pages back (Linux / glibc, as on the CI machine)."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import memory

ROOT = Path(__file__).resolve().parents[2]
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


_FAULTS_OF_A_REPEATED_FORWARD = """
import resource, sys, torch
from train import memory
if sys.argv[1] == "tuned":
    memory.tune_heap()
x, w = torch.randn(4096, 576), torch.randn(1536, 576)
def forward(x):  # a forward's pattern: transients of 9 and 24 MiB, allocated and freed in turn
    for _ in range(4):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        x = x + (torch.nn.functional.silu(h @ w.T) @ w) * 1e-3
    return x
forward(x)  # warm-up
for _ in range(7):  # the page faults of each of seven more forwards
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    forward(x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@linux
def test_tuned_heap_reuses_freed_transients_without_faulting_them_in_again():
    """In a fresh process (as a training run starts): by default glibc maps the largest transients afresh
    and gives the heap's top back, so a repeated forward faults its pages in again; the tuned heap reuses
    them. By default the forward after the warm-up faults; tuned, the median of seven forwards does not:
    where the heap can grow in place varies between processes (the address-space layout), so now and then
    one tuned forward still extends it, by a few MiB. (Later default forwards can stop faulting too, once
    glibc's own threshold has risen past the transients: the tuning makes that hold from the start.)"""

    def faults(mode: str) -> list[int]:
        run = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REPEATED_FORWARD, mode], capture_output=True,
                             text=True, check=True, cwd=ROOT)  # fmt: skip
        return [int(n) for n in run.stdout.split()]

    assert faults("default")[0] > 5000, "about 25,000-35,000 pages (100-140 MiB) on this pattern"
    assert statistics.median(faults("tuned")) < 500


_FAULTS_OF_A_STEP_AFTER_EACH_BATCH = """
import resource, sys
import torch
from train.buffer import BufferedStream, MixingBuffer

class Rows(BufferedStream):
    releases_pages_at_refill = sys.argv[1] == "release"

    def __init__(self):
        self.buffer, self.batch_size = MixingBuffer(4096, 64, seed=0), 1024  # a refill every 2 batches
        self.stats = {"tokens_yielded": 0, "dropped_tokens": 0}

    def _fill(self):
        self.buffer.push(torch.randn(1024, 64))

stream = Rows()
for _ in range(24):  # a step's transient after each batch: 24 MiB, touched and freed
    next(stream)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(6 * 2**20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@linux
def test_only_streams_that_run_the_model_hand_pages_back_at_their_refills():
    """A stream that hands the heap's free pages back at each refill makes the next step fault its pages in
    again; one that does not (a cache read: no forward's pages to keep apart from the steps') reuses them."""
    from train.activation_cache import CachedActivationStream
    from train.activations import ActivationStream

    def faults(mode: str) -> list[int]:
        run = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_STEP_AFTER_EACH_BATCH, mode],
                             capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
        return [int(n) for n in run.stdout.split()][4:]  # after the heap has grown to the step's size

    assert sum(faults("release")) > 5 * 6000, "the step after each of ten refills faults its ~6,100 pages"
    # where the heap can grow in place varies between processes: now and then one step still extends it by
    # its whole transient (6,080-6,150 pages); every other step reuses the pages
    keep = faults("keep")
    assert sum(keep) - max(keep) < 6144, "at most one late growth of the heap"
    assert ActivationStream.releases_pages_at_refill and not CachedActivationStream.releases_pages_at_refill


def test_object_size_counts_shared_objects_once():
    text = "x" * 100_000
    records = [[{"role": "user", "content": text}] for _ in range(10)]
    assert memory.object_mib(records) < 0.2, "ten records sharing one 100 kB string hold it once"
    records = [[{"role": "user", "content": "x" * 100_000 + str(i)}] for i in range(10)]
    assert 0.9 < memory.object_mib(records) < 1.1

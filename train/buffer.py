"""Token-level mixing buffer: fill, shuffle, hand out half, keep half, refill (as in the FAST paper).

Public API:
    MixingBuffer(capacity, d_in, seed=0)
        .push(x)          add float32 activations [n, d_in]
        .can_pop(n)       whether `pop(n)` can be served without more data
        .pop(n)           [n, d_in] float32, drawn from the shuffled, handed-out half
        .flush()          everything left, shuffled (end of a finite stream)
        .state_dict() / .load_state_dict(state)    tensors + ints, no pickle needed

Memory is bounded: one preallocated [capacity, d_in] float32 store plus a pending tensor that holds what
did not fit from the last push (at most one push); a push copies rows into free slots directly, and only
the rows that wait are copied again. Shuffling permutes slot indices, never the rows, so
there is no transient copy of the store: when the store is full a seeded permutation picks half of its
slots to hand out (in that order); popped slots become free and the next pushes fill them. Slots of the
handed-out half that are left over when a request cannot be served stay in the store and are mixed again
with the refill. Every pushed row is handed out exactly once (by `pop` or `flush`).
"""

from __future__ import annotations

import torch

from steer.errors import ConfigError
from train.memory import release_free_memory, tune_heap


class MixingBuffer:
    """A fixed-size store of activation rows, shuffled with a seeded generator."""

    def __init__(self, capacity: int, d_in: int, seed: int = 0):
        if capacity < 2:
            raise ConfigError(f"buffer capacity must be at least 2 tokens, got {capacity}")
        self.capacity = capacity
        self.d_in = d_in
        self.store = torch.zeros(capacity, d_in, dtype=torch.float32)
        self.free = torch.arange(capacity)  # empty slots, filled front first
        self.out = torch.empty(0, dtype=torch.long)  # shuffled slots being handed out, popped from the end
        self.pending = torch.empty(0, d_in, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def filled(self) -> int:
        """Rows in the store."""
        return self.capacity - len(self.free)

    def __len__(self) -> int:
        """Rows held (store and pending)."""
        return self.filled + len(self.pending)

    def push(self, x: torch.Tensor) -> None:
        """Add activation rows; what does not fit waits in `pending` until slots are freed."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected activations of shape [n, {self.d_in}], got {tuple(x.shape)}")
        left = []
        for rows in (self.pending, x.detach().to("cpu", torch.float32)):  # waiting rows first, then the new
            take = min(len(self.free), len(rows))
            self.store[self.free[:take]] = rows[:take]
            self.free = self.free[take:]
            left.append(rows[take:])
        self.pending = torch.cat(left)  # a copy of the rows that wait, never of the whole push

    def can_pop(self, n: int) -> bool:
        """Whether `pop(n)` can be served now (from the handed-out half, or after re-mixing a full store)."""
        self._check_n(n)
        return len(self.out) >= n or len(self) >= self.capacity

    def pop(self, n: int) -> torch.Tensor:
        """`n` rows from the shuffled half; re-mixes a full store when the half is used up."""
        if not self.can_pop(n):
            raise RuntimeError(
                f"buffer cannot serve {n} rows: push more activations first (holds {len(self)})"
            )
        if len(self.out) < n:
            self.push(self.pending[:0])  # move pending rows into the free slots: the store is now full
            perm = torch.randperm(self.capacity, generator=self.generator)
            self.out = perm[: self.capacity // 2]
        slots, self.out = self.out[-n:], self.out[:-n]
        self.free = torch.cat([self.free, slots])
        return self.store[slots]

    def flush(self) -> torch.Tensor:
        """Everything left (store and pending), shuffled; the buffer is empty afterwards."""
        used = torch.ones(self.capacity, dtype=torch.bool)
        used[self.free] = False
        rows = torch.cat([self.store[used], self.pending])
        rows = rows[torch.randperm(len(rows), generator=self.generator)]
        self.free, self.out = torch.arange(self.capacity), self.out[:0]
        self.pending = self.pending[:0]
        return rows

    def _check_n(self, n: int) -> None:
        if not 0 < n <= self.capacity // 2:
            raise ValueError(f"can only pop 1..{self.capacity // 2} rows (half the buffer), asked for {n}")

    def state_dict(self) -> dict:
        """Contents, slot bookkeeping and generator state: tensors and ints only."""
        return {
            "store": self.store.clone(),
            "free": self.free.clone(),
            "out": self.out.clone(),
            "pending": self.pending.clone(),
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` taken from a buffer of the same capacity and width."""
        if tuple(state["store"].shape) != (self.capacity, self.d_in):
            raise ValueError(
                f"buffer state holds {tuple(state['store'].shape)} rows x width, "
                f"this buffer is ({self.capacity}, {self.d_in})"
            )
        self.store.copy_(state["store"])
        self.free = state["free"].to(torch.long).clone()
        self.out = state["out"].to(torch.long).clone()
        self.pending = state["pending"].to(torch.float32).clone()
        self.generator.set_state(state["rng"])


class BufferedStream:
    """An activation stream that hands out `[batch_size, d_in]` rows from its mixing buffer.

    Subclasses set `buffer`, `batch_size` and `stats` (with `tokens_yielded` and `dropped_tokens`), and
    implement `_fill()`, which adds rows to the buffer or, at the end of a finite stream, calls `_finish()`.
    Freed heap pages are handed back before and after each refill (`train.memory`) where the refill runs the
    model (`releases_pages_at_refill`): a stream that reads a cache has no forward whose pages could pile up on the
    steps', and a trim would only make its next step fault its pages in again.
    After the end, the flushed remainder is handed out in whole batches; a last partial batch is dropped
    and counted. With a `quota` (the trainer's token count) the end comes as soon as the rows held cover
    it; a subclass may also cut its last fill short (a forward stream harvests only the rows still needed).
    """

    buffer: MixingBuffer
    batch_size: int
    stats: dict[str, int]
    exhausted: bool = False
    tail: torch.Tensor | None = None
    # tokens the consumer takes in all (None: open-ended); once the rows held cover the rest, the stream
    # hands them out (flushed, shuffled) instead of harvesting a refill nobody trains on
    quota: int | None = None
    # whether refills hand the heap's free pages back (the model's forward and the SAE steps take turns)
    releases_pages_at_refill: bool = True

    def _fill(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        self.exhausted = True
        self.tail = self.buffer.flush()

    @property
    def tokens_yielded(self) -> int:
        return self.stats["tokens_yielded"]

    def __iter__(self) -> BufferedStream:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def next_batch(self) -> torch.Tensor:
        """The next float32 [batch_size, d_in] tensor; StopIteration at the end of a finite stream."""
        n = self.batch_size
        if not self.exhausted and not self.buffer.can_pop(n):
            tune_heap()
            if self.releases_pages_at_refill:
                release_free_memory()  # the pages the steps freed are not held while the buffer refills
            while not self.exhausted and not self.buffer.can_pop(n):
                if self.quota is not None and self.tokens_yielded + len(self.buffer) >= self.quota:
                    self._finish()
                else:
                    self._fill()
            if self.releases_pages_at_refill:
                release_free_memory()  # nor are the refill's while the SAEs train
        if not self.exhausted:
            out = self.buffer.pop(n)
        else:
            if len(self.tail) < n:
                self.stats["dropped_tokens"] += len(self.tail)
                self.tail = self.tail[:0]
                raise StopIteration
            out, self.tail = self.tail[:n], self.tail[n:]
        self.stats["tokens_yielded"] += n
        return out

    def _buffer_state(self) -> dict:
        """The hand-out state: end flag, counters, flushed remainder and the buffer (tensors and ints)."""
        tail = self.tail if self.tail is not None else torch.empty(0, self.buffer.d_in)
        return {
            "exhausted": self.exhausted,
            "stats": dict(self.stats),
            "tail": tail.clone(),
            **{f"buffer_{k}": v for k, v in self.buffer.state_dict().items()},
        }

    def _load_buffer_state(self, state: dict) -> None:
        self.exhausted = bool(state["exhausted"])
        self.stats = {k: int(v) for k, v in state["stats"].items()}
        self.tail = state["tail"].to(torch.float32).clone()
        self.buffer.load_state_dict(
            {k.removeprefix("buffer_"): v for k, v in state.items() if k.startswith("buffer_")}
        )


def check_identity(saved: dict, mine: dict, what: str) -> None:
    """Raise if a saved stream state was taken from a stream with other settings (naming each one)."""
    diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    if diff:
        listed = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"{what} state does not match this stream ({listed})")

"""Token-level mixing buffer: fill, shuffle, hand out half, keep half, refill (as in the FAST paper).

Public API:
    MixingBuffer(capacity, d_in, seed=0)
        .push(x)          add float32 activations [n, d_in]
        .can_pop(n)       whether `pop(n)` can be served without more data
        .pop(n)           [n, d_in] float32, drawn from the shuffled, handed-out half
        .flush()          everything left, shuffled (end of a finite stream)
        .state_dict() / .load_state_dict(state)    tensors + ints, no pickle needed

Memory is bounded: one preallocated [capacity, d_in] float32 store plus a pending tensor that holds what
did not fit from the last push (at most one push). When the handed-out half is used up, the rows that
remain in it stay in the store (nothing is lost), new activations fill the freed slots and the whole store
is shuffled again. Every pushed row is handed out exactly once (by `pop` or `flush`).
"""

from __future__ import annotations

import torch


class MixingBuffer:
    """A fixed-size store of activation rows, shuffled with a seeded generator."""

    def __init__(self, capacity: int, d_in: int, seed: int = 0):
        if capacity < 2:
            raise ValueError(f"buffer capacity must be at least 2 tokens, got {capacity}")
        self.capacity = capacity
        self.d_in = d_in
        self.store = torch.empty(capacity, d_in, dtype=torch.float32)
        self.filled = 0  # rows [0, filled) are valid
        self.n_out = 0  # rows [filled - n_out, filled) are the shuffled half being handed out
        self.pending = torch.empty(0, d_in, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """Rows held (store and pending)."""
        return self.filled + len(self.pending)

    def push(self, x: torch.Tensor) -> None:
        """Add activation rows; what does not fit waits in `pending` until slots are freed."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected activations of shape [n, {self.d_in}], got {tuple(x.shape)}")
        x = x.detach().to(torch.float32)
        if len(self.pending):
            x = torch.cat([self.pending, x])
        free = self.capacity - self.filled
        take = min(free, len(x))
        self.store[self.filled : self.filled + take] = x[:take]
        self.filled += take
        self.pending = x[take:].clone()

    def can_pop(self, n: int) -> bool:
        """Whether `pop(n)` can be served now (from the handed-out half, or after a re-shuffle of a full store)."""
        self._check_n(n)
        if self.n_out >= n:
            return True
        return self.filled + len(self.pending) >= self.capacity

    def pop(self, n: int) -> torch.Tensor:
        """`n` rows from the shuffled half; re-shuffles a full store when the half is used up."""
        if not self.can_pop(n):
            raise RuntimeError(
                f"buffer cannot serve {n} rows: push more activations first (holds {len(self)})"
            )
        if self.n_out < n:
            self.n_out = 0  # leftovers of the old half stay in the store and are mixed again
            self.push(self.pending[:0])  # move pending rows into the freed slots
            self._shuffle()
            self.n_out = self.capacity // 2
        out = self.store[self.filled - n : self.filled].clone()
        self.filled -= n
        self.n_out -= n
        return out

    def flush(self) -> torch.Tensor:
        """Everything left (store and pending), shuffled; the buffer is empty afterwards."""
        rows = torch.cat([self.store[: self.filled], self.pending])
        rows = rows[torch.randperm(len(rows), generator=self.generator)]
        self.filled, self.n_out = 0, 0
        self.pending = self.pending[:0]
        return rows

    def _shuffle(self) -> None:
        perm = torch.randperm(self.filled, generator=self.generator)
        self.store[: self.filled] = self.store[: self.filled][perm]

    def _check_n(self, n: int) -> None:
        if not 0 < n <= self.capacity // 2:
            raise ValueError(f"can only pop 1..{self.capacity // 2} rows (half the buffer), asked for {n}")

    def state_dict(self) -> dict:
        """Contents, positions and generator state: tensors and ints only."""
        return {
            "store": self.store[: self.filled].clone(),
            "pending": self.pending.clone(),
            "n_out": self.n_out,
            "capacity": self.capacity,
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` taken from a buffer of the same capacity and width."""
        if int(state["capacity"]) != self.capacity or state["store"].shape[1:] != (self.d_in,):
            raise ValueError(
                f"buffer state is for capacity {state['capacity']} x {tuple(state['store'].shape[1:])}, "
                f"this buffer is {self.capacity} x ({self.d_in},)"
            )
        self.filled = len(state["store"])
        self.store[: self.filled] = state["store"]
        self.pending = state["pending"].to(torch.float32).clone()
        self.n_out = int(state["n_out"])
        self.generator.set_state(state["rng"])

"""The mixing buffer: every row handed out once, bounded memory, real shuffling, exact state round trip."""

from __future__ import annotations

import pytest
import torch

from train.buffer import MixingBuffer

D = 4


def _rows(start: int, n: int) -> torch.Tensor:
    """Rows whose first column is a unique id."""
    x = torch.randn(n, D)
    x[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    return x


def _drive(buffer: MixingBuffer, pushes: list[int], pop: int) -> list[torch.Tensor]:
    """Push chunks of the given sizes, popping whenever possible; returns popped tensors."""
    out, next_id, store_ptr = [], 0, buffer.store.data_ptr()
    for n in pushes:
        buffer.push(_rows(next_id, n))
        next_id += n
        assert (
            buffer.store.shape == (buffer.capacity, D) and buffer.store.data_ptr() == store_ptr
        )  # never moves
        assert len(buffer.pending) <= n  # overflow is at most the last push
        while buffer.can_pop(pop):
            out.append(buffer.pop(pop))
    return out


def test_every_row_handed_out_exactly_once():
    buffer = MixingBuffer(capacity=100, d_in=D, seed=0)
    pushes = [37, 5, 61, 80, 12, 44, 90, 3]
    popped = _drive(buffer, pushes, pop=16)
    assert all(p.shape == (16, D) for p in popped)
    assert len(popped) >= 10
    rest = buffer.flush()
    ids = torch.cat(popped + [rest])[:, 0].long().sort().values
    assert ids.tolist() == list(range(sum(pushes)))
    assert len(buffer) == 0


def test_fill_shuffle_hand_out_half_then_refill():
    buffer = MixingBuffer(capacity=64, d_in=D, seed=1)
    buffer.push(_rows(0, 63))
    assert not buffer.can_pop(8)  # not full yet: nothing is handed out before the first fill
    buffer.push(_rows(63, 1))
    first = torch.cat([buffer.pop(8) for _ in range(4)])  # half of the buffer
    assert not buffer.can_pop(8)  # half kept: must refill before more is handed out
    ids = first[:, 0].long()
    assert ids.max() - ids.min() > 32  # drawn from across the whole buffer, not the last rows pushed
    assert ids.tolist() != sorted(ids.tolist())
    buffer.push(_rows(64, 32))
    assert buffer.can_pop(8)
    second = torch.cat([buffer.pop(8) for _ in range(4)])[:, 0].long()
    assert (second < 64).any() and (second >= 64).any()  # kept rows mix with new ones
    assert not set(second.tolist()) & set(ids.tolist())


def test_state_round_trip_continues_identically():
    a = MixingBuffer(capacity=50, d_in=D, seed=3)
    _drive(a, [30, 33, 7], pop=10)
    b = MixingBuffer(capacity=50, d_in=D, seed=99)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(5)
    out_a = _drive(a, [40, 22, 9], pop=10)
    torch.manual_seed(5)
    out_b = _drive(b, [40, 22, 9], pop=10)
    assert len(out_a) == len(out_b) > 0
    for x, y in zip(out_a, out_b, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.flush(), b.flush())


def test_errors():
    buffer = MixingBuffer(capacity=10, d_in=D)
    with pytest.raises(ValueError, match=r"shape \[n, 4\]"):
        buffer.push(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="half the buffer"):
        buffer.can_pop(6)
    with pytest.raises(RuntimeError, match="push more activations"):
        buffer.pop(2)
    with pytest.raises(ValueError, match=r"this buffer is \(12, 4\)"):
        MixingBuffer(capacity=12, d_in=D).load_state_dict(buffer.state_dict())

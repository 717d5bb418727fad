"""A resumable synthetic activation stream for trainer tests: sparse codes through a random dictionary."""

from __future__ import annotations

import torch


class SparseStream:
    """Global batches `x = s @ D + c` with `n_active` random codes per token, from a private generator.

    With `rank`/`world_size` it yields that process's slice of each global batch, so a data-parallel run
    sees exactly the tokens a single-process run sees. `fail_after` raises after that many batches (a crash).
    """

    def __init__(
        self,
        d_in: int = 16,
        n_atoms: int = 32,
        batch: int = 64,
        n_active: int = 3,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fail_after: int | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(1000 + seed)
        self.dictionary = torch.randn(n_atoms, d_in, generator=g)
        self.offset = torch.randn(d_in, generator=g) * 2
        self.d_in, self.n_atoms, self.batch, self.n_active = d_in, n_atoms, batch, n_active
        self.rank, self.world_size, self.fail_after = rank, world_size, fail_after
        self.gen = torch.Generator().manual_seed(seed)
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.fail_after is not None and self.served >= self.fail_after:
            raise RuntimeError("simulated crash")
        idx = torch.rand(self.batch, self.n_atoms, generator=self.gen).topk(self.n_active, dim=-1).indices
        codes = torch.zeros(self.batch, self.n_atoms).scatter_(
            -1, idx, torch.rand(self.batch, self.n_active, generator=self.gen) * 3
        )
        x = codes @ self.dictionary + self.offset
        self.served += 1
        per = self.batch // self.world_size
        return x[self.rank * per : (self.rank + 1) * per]

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.served = state["served"]


def stream_run(layer: int = 1, batch_size: int = 128, method: str = "fast", seed: int = 0, **stream):
    """A `RunConfig` for stream tests: the corpus is passed to the stream directly, so `data` only names it."""
    from train.config import TrainConfig
    from train.run_config import DataConfig, RunConfig, StreamSettings

    sources = ["<test corpus>"]
    data = DataConfig(method=method, chat=sources, pretrain=sources, seed=seed)
    return RunConfig(
        layer=layer,
        training=TrainConfig(total_tokens=batch_size, batch_size=batch_size),
        data=data,
        stream=StreamSettings(**stream),
    )

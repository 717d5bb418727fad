"""Process-group helpers for data-parallel training (accelerate / torch.distributed), no-ops in one process."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @classmethod
    def current(cls, device: str | None = None) -> DistContext:
        """The context of an initialised torch.distributed group (e.g. set up by accelerate), else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device or "cpu")
        return cls(device=device or "cpu")

    @classmethod
    def from_accelerate(cls, cpu: bool = False) -> DistContext:
        """Initialise the process group the way `accelerate launch` set it up (one process otherwise)."""
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        return cls(rank=state.process_index, world_size=state.num_processes, device=str(state.device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average `tensors` in place over all processes (one flat all-reduce)."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equally shaped tensors of every process along dim 0 (rank order)."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

"""Worker of the 2-process gloo test (a light module: spawned children import only this)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from train.config import SAETrainSpec, TrainConfig
from train.distributed import DistContext
from train.trainer import SAETrainer

from .streams import SparseStream


def dp_config() -> TrainConfig:
    specs = [
        SAETrainSpec(arch="standard", expansion=2, sparsity_coefficient=0.05),
        SAETrainSpec(arch="jumprelu", expansion=2, jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.05),
        SAETrainSpec(arch="topk", expansion=2, k=6),
    ]
    return TrainConfig(
        total_tokens=20 * 64,
        batch_size=64,
        saes=specs,
        lr=2e-2,
        lr_end=2e-3,
        dead_feature_window=640,
        autocast=False,  # float32: one process and two agree to float32 rounding
        checkpoint_every=10,
        log_every=5,
        seed=3,
    )


def dp_worker(rank: int, world: int, port: int, out: str) -> None:
    """Train `dp_config()` as process `rank` of `world`; save this replica's final state to rankN.safetensors."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = SAETrainer(dp_config(), d_in=16, out_dir=out, dist=DistContext.current(), progress=False)
        trainer.fit(SparseStream(seed=2, rank=rank, world_size=world))
        state = {
            f"{i}.{k}": v.contiguous()
            for i, o in enumerate(trainer.objectives)
            for k, v in o.state_dict().items()
        }
        save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()

"""The one way from a `RunConfig` to SAE folders: model -> data -> activation stream -> trainer -> folders.

`fast-steer train`, `fast-steer run` (the main job), `experiment reproduce` and `bench train` all call
`train`. The SAE metadata is built once, in `run_metadata`, when the folders are written: from the run
config and the stream's final statistics, so every command writes the same keys with real values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hub import LoadedModel, load_model, resolve_device, sae_metadata
from steer.errors import ConfigError
from train.activation_cache import CachedActivationStream
from train.activations import ActivationStream
from train.data import load_conversations, load_texts
from train.distributed import DistContext
from train.run_config import RunConfig
from train.trainer import SAETrainer, TrainResult, norm_scaling_factor

Stream = ActivationStream | CachedActivationStream


def open_stream(
    cfg: RunConfig, dist: DistContext, loaded: LoadedModel | tuple | None = None
) -> tuple[Stream, str]:
    """The run's activation stream (from the model, or from a harvested cache) and the model's source."""
    if cfg.data.activations is not None:
        stream = CachedActivationStream(cfg, dist.rank, dist.world_size)
        return stream, stream.model_source
    if loaded is None:
        loaded = load_model(cfg.model, dtype=cfg.model_dtype, device=dist.device, device_map=cfg.device_map)
    model, tok = loaded
    loader = load_texts if cfg.data.method == "bt-p" else load_conversations
    corpus = loader(cfg.data.sources, split="train", held_out_fraction=cfg.data.held_out_fraction)
    if len(corpus) == 0:
        raise ConfigError(f"no training records found in {corpus.sources}")
    stream = ActivationStream(model, tok, corpus, cfg, dist.rank, dist.world_size)
    return stream, getattr(loaded, "source", cfg.model)


def estimate_norm_scaling_factor(stream: Stream, n_tokens: int) -> float:
    """The trainer's `norm_scaling_factor` over the stream's first `n_tokens` tokens (whole batches)."""
    batches = [next(stream)]
    while sum(map(len, batches)) < n_tokens:
        batches.append(next(stream))
    return norm_scaling_factor(torch.cat(batches))


def run_metadata(cfg: RunConfig, stream: Stream, model_source: str, created_by: str) -> dict[str, Any]:
    """SAELens metadata plus fast-steer's provenance: the run config and what the stream really yielded."""
    provenance = stream.provenance()
    return sae_metadata(
        model_name=cfg.model,
        layer=cfg.layer,
        context_size=provenance.pop("context_size"),
        dataset_path=",".join(provenance["data"]),
        **provenance,
        exclude_first_token=cfg.stream.exclude_first_token,
        max_norm_multiple=cfg.stream.max_norm_multiple,
        held_out_fraction=cfg.data.held_out_fraction,
        model_source=model_source,
        created_by=created_by,
        run=cfg.to_dict(),
    )


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    loaded: LoadedModel | tuple | None = None,
    resume: bool = False,
    progress: bool = True,
    dist: DistContext | None = None,
    created_by: str = "fast-steer train",
) -> TrainResult:
    """Train the SAEs of `cfg.training` on one activation stream; each lands in `out_dir` (one SAE) or
    `out_dir/<spec name>` (a sweep). `loaded` reuses an already loaded (model, tokenizer)."""
    dist = dist or DistContext.current(resolve_device(cfg.device))
    stream, model_source = open_stream(cfg, dist, loaded)
    return fit_stream(cfg, stream, model_source, out_dir, resume=resume, progress=progress, dist=dist,
                      created_by=created_by)  # fmt: skip


def fit_stream(
    cfg: RunConfig,
    stream: Stream,
    model_source: str,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    dist: DistContext | None = None,
    created_by: str = "fast-steer train",
) -> TrainResult:
    """The training half of `train`, on a stream `open_stream(cfg, ...)` opened (benchmarks time it alone)."""
    dist = dist or DistContext.current(resolve_device(cfg.device))
    stream.quota = cfg.training.total_steps * stream.batch_size  # harvest only what training takes
    trainer = SAETrainer(
        cfg.training,
        stream.d_in,
        out_dir,
        metadata=lambda: run_metadata(cfg, stream, model_source, created_by),
        dist=dist,
        progress=progress,
    )
    return trainer.fit(stream, resume=resume, init_tokens=cfg.init_tokens)

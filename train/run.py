"""One training run end to end (model -> data -> activation stream -> SAEs -> folders) and the evaluation
of a trained SAE folder: the Python API behind `fast-steer train` and `fast-steer eval`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hub import LoadedModel, load_model, sae_metadata
from train.activations import ActivationStream, StreamConfig, default_max_len
from train.config import TrainConfig
from train.data import load_conversations, load_texts
from train.distributed import DistContext
from train.trainer import SAETrainer, TrainResult

log = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """What the SAEs read: model, layer, method and data files; stream settings beyond the batch size."""

    layer: int
    data: list[str] = field(default_factory=list)  # conversations (fast, bt-f) and held-out evaluation
    pretrain_data: list[str] = field(default_factory=list)  # texts (bt-p)
    method: str = "fast"
    model: str = "default"
    model_dtype: str = "auto"  # harvesting dtype: see hub.model.fast_dtype
    held_out_fraction: float = 0.05
    buffer_tokens: int = 65536
    token_budget: int = 8192
    max_len: int | None = None  # FAST truncation; None: 8192, or the model's context if shorter
    block_len: int = 2048
    exclude_first_token: bool = False
    max_norm_multiple: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("fast", "bt-f", "bt-p"):
            raise ValueError(f"unknown method {self.method!r}; expected fast, bt-f or bt-p")
        if self.method == "bt-p" and not self.pretrain_data:
            raise ValueError("method bt-p trains on pretraining text: pass --pretrain-data PATH")
        if self.method != "bt-p" and not self.data:
            raise ValueError(f"method {self.method} trains on conversations: pass --data PATH")


def train_run(
    cfg: TrainConfig,
    data: DataSpec,
    out_dir: str | Path,
    *,
    loaded: LoadedModel | tuple | None = None,
    resume: bool = False,
    progress: bool = True,
    dist: DistContext | None = None,
) -> TrainResult:
    """Train the SAEs of `cfg` on one activation stream of `data`; each SAE lands in `out_dir` (one SAE)
    or `out_dir/<spec.name>` (a sweep). `loaded` reuses an already loaded (model, tokenizer)."""
    dist = dist or DistContext.current()
    if loaded is None:
        loaded = load_model(data.model, dtype=data.model_dtype, device=dist.device)
    model, tok = loaded
    if data.method == "bt-p":
        corpus = load_texts(data.pretrain_data, split="train", held_out_fraction=data.held_out_fraction)
    else:
        corpus = load_conversations(data.data, split="train", held_out_fraction=data.held_out_fraction)
    if len(corpus) == 0:
        raise ValueError(f"no training records found in {corpus.sources}")
    max_len = data.max_len or default_max_len(model)
    stream = ActivationStream(
        model,
        tok,
        corpus,
        StreamConfig(
            layer=data.layer,
            method=data.method,
            batch_size=cfg.batch_size // dist.world_size,
            buffer_tokens=data.buffer_tokens,
            token_budget=data.token_budget,
            max_len=max_len,
            block_len=data.block_len,
            exclude_first_token=data.exclude_first_token,
            max_norm_multiple=data.max_norm_multiple,
            seed=data.seed,
            rank=dist.rank,
            world_size=dist.world_size,
        ),
    )
    described = stream.describe()
    extra = {k: v for k, v in described.items() if k not in ("hook_name", "layer")}
    metadata = sae_metadata(
        model_name=data.model,
        layer=data.layer,
        context_size=max_len if data.method == "fast" else data.block_len,
        dataset_path=",".join(map(str, data.pretrain_data if data.method == "bt-p" else data.data)),
        **extra,
        held_out_fraction=data.held_out_fraction,
        model_source=getattr(loaded, "source", data.model),
    )
    trainer = SAETrainer(cfg, stream.d_in, out_dir, metadata=metadata, dist=dist, progress=progress)
    return trainer.fit(stream, resume=resume)

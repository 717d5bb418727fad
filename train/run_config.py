"""The one configuration of a training run: model, device, data, activation stream and optimisation.

`RunConfig` is the only input of `train.pipeline.train`; every command that trains (`fast-steer train`,
`run`, `experiment reproduce`, `bench train`) builds one and nothing else. Its sections:

- `data` (`DataConfig`): the method (FAST, BT(F), BT(P)), the files it reads, the held-out split and the
  data seed; or `activations`, a folder written by `fast-steer harvest`, to train from instead of the model;
- `stream` (`StreamSettings`): how activations are produced (buffer, padding budget, truncation, blocks,
  exclusions, epochs);
- `training` (`TrainConfig`, `train.config`): the SAEs and their optimisation (presets live there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hub.device_map import DeviceMap
from steer.errors import ConfigError, MissingFileError
from train.config import TrainConfig
from train.sequences import check_method


@dataclass
class DataConfig:
    """What the SAEs read."""

    method: str = "fast"  # fast | bt-f | bt-p
    chat: list[str] = field(default_factory=list)  # conversation files/folders (fast, bt-f)
    pretrain: list[str] = field(default_factory=list)  # pretraining text files/folders (bt-p)
    held_out_fraction: float = 0.05  # content-hash share kept out of training (and used by `eval`)
    seed: int = 0  # data order and mixing buffer
    activations: str | None = None  # a `fast-steer harvest` folder: train from it, run no model

    def validate(self) -> None:
        check_method(self.method)
        if not 0 <= self.held_out_fraction < 1:
            raise ConfigError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if self.activations is not None:
            if not (Path(self.activations) / "harvest.json").is_file():
                raise MissingFileError(
                    f"{self.activations} is not a harvested activation folder (no harvest.json); "
                    "write one with `fast-steer harvest`"
                )
            return
        if self.method == "bt-p" and not self.pretrain:
            raise ConfigError("method bt-p trains on pretraining text: pass --pretrain-data PATH")
        if self.method != "bt-p" and not self.chat:
            raise ConfigError(f"method {self.method} trains on conversations: pass --data PATH")

    @property
    def sources(self) -> list[str]:
        """The files this method reads."""
        return list(self.pretrain if self.method == "bt-p" else self.chat)


@dataclass
class StreamSettings:
    """How residual activations are produced and mixed (see `train.activations`)."""

    buffer_tokens: int = 65536  # mixing buffer: filled, shuffled, half handed out, refilled
    # padded tokens per harvesting forward: on a CPU as fast as 8,192 with the tuned heap (`train.memory`), and
    # about 100 MiB lower at peak
    token_budget: int = 4096
    # harvesting batch widths rounded up to a multiple of this: batch shapes repeat, so the per-shape kernel
    # caches (oneDNN's primitives above all) stop growing early, and AMX's 16-row tiles fit (README, Speed)
    width_multiple: int = 16
    max_len: int | None = None  # FAST truncation per conversation; None: 8,192 or the model's context
    block_len: int = 2048  # BT block length
    pool_size: int = 2048  # records tokenised and length-bucketed together
    exclude_first_token: bool = False  # drop position 0 (its norm is ~100x the rest on SmolLM2)
    max_norm_multiple: float | None = None  # drop activations above this multiple of the median norm
    max_epochs: int | None = None  # None: as many passes over the data as the token budget needs

    def validate(self, batch_size: int) -> None:
        for name in ("buffer_tokens", "token_budget", "width_multiple", "block_len", "pool_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_len is not None and self.max_len < 1:
            raise ConfigError(f"max_len must be positive, got {self.max_len}")
        if self.buffer_tokens < 2 * batch_size:
            raise ConfigError(
                f"buffer_tokens ({self.buffer_tokens}) must be at least 2 x the batch size ({batch_size}): "
                "the buffer hands out half of itself between refills"
            )
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"max_epochs must be positive or None, got {self.max_epochs}")
        if self.max_norm_multiple is not None and self.max_norm_multiple <= 0:
            raise ConfigError(f"max_norm_multiple must be positive or None, got {self.max_norm_multiple}")


@dataclass
class RunConfig:
    """Everything a training run needs; `to_dict` is what its SAE folders and caches record."""

    layer: int
    training: TrainConfig
    model: str = "default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # a model larger than one device: spread over devices by accelerate (`hub.DeviceMap`), each layer's
    # activations read where the layer runs; `device` is then where the SAEs train
    device_map: DeviceMap | None = None
    # harvesting dtype; auto: bfloat16 on CUDA (and AMX CPUs), else float32; from a cache: the cache's own (another
    # dtype is refused, `train.activation_cache.check_harvest_dtype`)
    model_dtype: str = "auto"
    # torch.compile the harvesting forward's layers (`train.compiled`): a one-off compile, then a faster forward;
    # None (auto): on a CPU with a C++ compiler, for runs of 64k tokens or more (`resolve_compile`)
    compile: bool | None = None
    data: DataConfig = field(default_factory=DataConfig)
    stream: StreamSettings = field(default_factory=StreamSettings)

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ConfigError(
                f"layer must be a non-negative integer (decoder block index), got {self.layer!r}"
            )
        self.data.validate()
        self.stream.validate(self.training.batch_size)

    @property
    def init_tokens(self) -> int:
        """Tokens the SAE initialisation reads (b_dec's geometric median and the normalisation factor):
        the first half of the mixing buffer, as SAELens uses its first storage half-buffer."""
        return self.stream.buffer_tokens // 2

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["training"] = self.training.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        if unknown := set(data) - known:
            raise ConfigError(f"unknown RunConfig keys: {sorted(unknown)}")
        values = dict(data)
        values["training"] = TrainConfig.from_dict(values["training"])
        values["data"] = DataConfig(**values.get("data", {}))
        values["stream"] = StreamSettings(**values.get("stream", {}))
        if isinstance(values.get("device_map"), dict):
            values["device_map"] = DeviceMap(**values["device_map"])
        return cls(**values)

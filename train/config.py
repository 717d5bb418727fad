"""Training configuration: one `TrainConfig` per run, one `SAETrainSpec` per SAE trained on the stream.

Two presets: `paper` (App. C of arXiv 2506.07691, built on SAELens 5.3.3) and `default` (tuned so that a
useful SAE trains on a 2-core CPU in minutes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from hub import fast_dtype
from steer.errors import ConfigError
from steer.sae import architectures, sae_class

SAELENS_JUMPRELU = 0.001  # SAELens 5.x default bandwidth and initial threshold (the paper's recipe)


def coefficient_architectures() -> tuple[str, ...]:
    """The registered architectures whose sparsity is set by a loss coefficient (not by `k`)."""
    return tuple(a for a in architectures() if sae_class(a).sparsity != "k")


@dataclass
class SAETrainSpec:
    """One SAE of a run: its architecture, width and sparsity settings."""

    arch: str = "standard"
    expansion: int = 8
    sparsity_coefficient: float | None = None  # L1 (standard) or L0 (jumprelu) coefficient; preset if None
    k: int | None = None  # topk only
    jumprelu_bandwidth: float | None = None  # jumprelu only; None = the preset's
    jumprelu_init_threshold: float | None = None  # jumprelu only; None = the preset's
    aux_k_coefficient: float = 1.0  # topk auxiliary loss against dead features

    def __post_init__(self) -> None:
        if self.arch not in architectures():
            raise ConfigError(
                f"unknown SAE architecture {self.arch!r}; expected one of {', '.join(architectures())}"
            )
        if self.expansion < 1:
            raise ConfigError(f"expansion factor must be >= 1, got {self.expansion}")
        if self.arch == "topk" and (self.k is None or self.k < 1):
            raise ConfigError(f"a topk SAE needs k >= 1 (got k={self.k}); pass --k")
        if self.sparsity_coefficient is not None and self.sparsity_coefficient < 0:
            raise ConfigError(f"sparsity coefficient must be >= 0, got {self.sparsity_coefficient}")
        for value in (self.jumprelu_bandwidth, self.jumprelu_init_threshold):
            if value is not None and value <= 0:
                raise ConfigError(f"jumprelu bandwidth and initial threshold must be positive, got {value}")

    @property
    def name(self) -> str:
        """Folder name of this SAE inside a sweep, e.g. `standard-x8-l1_5`, `topk-x8-k32`."""
        if self.arch == "topk":
            return f"topk-x{self.expansion}-k{self.k}"
        name = f"{self.arch}-x{self.expansion}-{sae_class(self.arch).sparsity}_{self.sparsity_coefficient:g}"
        if self.arch == "jumprelu":  # bandwidth / initial threshold, where not SAELens' 0.001
            if self.jumprelu_bandwidth not in (None, SAELENS_JUMPRELU):
                name += f"-bw_{self.jumprelu_bandwidth:g}"
            if self.jumprelu_init_threshold not in (None, SAELENS_JUMPRELU):
                name += f"-t0_{self.jumprelu_init_threshold:g}"
        return name


@dataclass
class TrainConfig:
    """Optimisation settings shared by every SAE of a run (a single activation stream)."""

    total_tokens: int
    saes: list[SAETrainSpec] = field(default_factory=lambda: [SAETrainSpec()])
    batch_size: int = 4096  # tokens per optimiser step, summed over all processes
    lr: float = 4e-4
    lr_end: float = 4e-5  # floor reached by the cosine decay
    lr_warmup_fraction: float = 0.01  # of the steps
    lr_decay_fraction: float = 0.2  # final linear decay from the floor to 0, of the steps
    sparsity_warmup_fraction: float = 0.05  # of the steps
    l1_coefficient: float = 5.0  # default for standard SAEs without their own coefficient
    l0_coefficient: float = 0.01  # default for jumprelu SAEs without their own coefficient
    jumprelu_bandwidth: float = SAELENS_JUMPRELU  # default for jumprelu SAEs without their own
    jumprelu_init_threshold: float = SAELENS_JUMPRELU  # default for jumprelu SAEs without their own
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0
    dead_feature_window: int = 200_000  # tokens without firing after which a feature counts as dead
    # "expected_average_only_in" (SAELens): train on activations scaled to an average norm of sqrt(d_in)
    # (factor estimated on the initialisation tokens, folded into the saved weights); "none": raw activations
    normalize_activations: str = "expected_average_only_in"
    norm_scaling_factor: float | None = None  # a fixed factor (one for every method of a comparison)
    encoder_init: str = "transpose"  # "kaiming": W_enc drawn independently (SAELens); "transpose": W_dec.T
    sae_dtype: str = "float32"
    # bfloat16 autocast of the SAE step; None: where bfloat16 matmuls are native (`sae_autocast`)
    autocast: bool | None = None
    seed: int = 42
    checkpoint_every: int = 100  # steps; 0 = only at the end
    log_every: int = 10  # steps between JSONL log lines
    gsnr_every: int = (
        0  # steps between gradient signal-to-noise measurements (a multiple of log_every; 0: off)
    )
    gsnr_micro_batches: int = 8  # micro-batches of one batch that the GSNR is measured over
    preset: str = "default"

    def __post_init__(self) -> None:
        if self.total_tokens <= 0:
            raise ConfigError(f"total_tokens must be positive, got {self.total_tokens}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if not self.saes:
            raise ConfigError("at least one SAE spec is needed")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ConfigError(
                f"normalize_activations={self.normalize_activations!r}; expected none or expected_average_only_in"
            )
        if self.norm_scaling_factor is not None and (
            self.norm_scaling_factor <= 0 or self.normalize_activations == "none"
        ):
            raise ConfigError(
                f"norm_scaling_factor={self.norm_scaling_factor} needs normalize_activations="
                "expected_average_only_in and a positive value"
            )
        if self.gsnr_every and (self.gsnr_every < 0 or self.gsnr_every % self.log_every):
            raise ConfigError(
                f"gsnr_every ({self.gsnr_every}) must be a multiple of log_every ({self.log_every})"
            )
        if self.encoder_init not in ("kaiming", "transpose"):
            raise ConfigError(f"encoder_init={self.encoder_init!r}; expected kaiming or transpose")
        if not 0 < self.lr_end <= self.lr:
            raise ConfigError(f"need 0 < lr_end <= lr, got lr={self.lr}, lr_end={self.lr_end}")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise ConfigError("lr_warmup_fraction + lr_decay_fraction must be <= 1")
        names = [s.name for s in self.resolved_specs()]
        if len(set(names)) != len(names):
            raise ConfigError(f"two SAEs of the sweep have the same settings: {names}")

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.batch_size)

    def local_batch_size(self, world_size: int) -> int:
        """Tokens per step in each of `world_size` processes (the batch must split evenly)."""
        if self.batch_size % world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} must be divisible by the number of processes {world_size}"
            )
        return self.batch_size // world_size

    @property
    def lr_warmup_steps(self) -> int:
        return round(self.lr_warmup_fraction * self.total_steps)

    @property
    def lr_decay_steps(self) -> int:
        return round(self.lr_decay_fraction * self.total_steps)

    @property
    def sparsity_warmup_steps(self) -> int:
        return round(self.sparsity_warmup_fraction * self.total_steps)

    def schedule(self) -> dict[str, int]:
        """The step counts the fractions resolve to for this run."""
        return {
            "total_steps": self.total_steps,
            "lr_warmup_steps": self.lr_warmup_steps,
            "lr_decay_steps": self.lr_decay_steps,
            "sparsity_warmup_steps": self.sparsity_warmup_steps,
        }

    @property
    def final_tokens(self) -> int:
        """Tokens actually trained on: whole batches, so `total_tokens` rounded up to a batch."""
        return self.total_steps * self.batch_size

    def sae_autocast(self, device: str) -> bool:
        """Whether the SAE step runs under bfloat16 autocast on `device`: `autocast`, or where it is None,
        where bfloat16 matmuls are native (`hub.fast_dtype`: CUDA, AMX / AVX-512 BF16 CPUs). At the main
        job's budget autocast trains 1.2-1.3x faster with the same evaluation metrics (README, Speed)."""
        if self.autocast is not None:
            return self.autocast
        return fast_dtype(str(device)) == "bfloat16"

    def resolved_specs(self) -> list[SAETrainSpec]:
        """The SAE specs with the preset's sparsity coefficient (and jumprelu settings) filled in where unset."""
        out = []
        for spec in self.saes:
            if spec.sparsity_coefficient is None and spec.arch != "topk":
                coeff = self.l1_coefficient if spec.arch == "standard" else self.l0_coefficient
                spec = replace(spec, sparsity_coefficient=coeff)
            if spec.arch == "jumprelu":
                spec = replace(
                    spec,
                    jumprelu_bandwidth=spec.jumprelu_bandwidth or self.jumprelu_bandwidth,
                    jumprelu_init_threshold=spec.jumprelu_init_threshold or self.jumprelu_init_threshold,
                )
            out.append(spec)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["saes"] = [asdict(s) for s in self.resolved_specs()]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown TrainConfig keys: {sorted(unknown)}")
        data = dict(data)
        data["saes"] = [SAETrainSpec(**s) for s in data.get("saes", [])]
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # arXiv 2506.07691 App. C (SAELens 5.3.3), value for value: 40.96M tokens in batches of 128 (320,000
    # steps); Adam (0.9, 0.999); lr 7e-5 with 16,000 warm-up steps, cosine decay to 7e-6 and 64,000 final
    # decay steps; L1 5 / L0 0.01 with 10,000 sparsity warm-up steps; seed 42; float32 SAE; raw
    # activations; independent Kaiming-uniform W_enc / W_dec; b_dec = geometric median of the first
    # half-buffer; JumpReLU bandwidth and initial threshold 0.001. Fractions, so that --tokens scales them.
    "paper": dict(
        total_tokens=40_960_000,
        batch_size=128,
        lr=7e-5,
        lr_end=7e-6,
        lr_warmup_fraction=16_000 / 320_000,
        lr_decay_fraction=64_000 / 320_000,
        sparsity_warmup_fraction=10_000 / 320_000,
        normalize_activations="none",
        encoder_init="kaiming",
        sae_dtype="float32",
        autocast=False,
        seed=42,
        l1_coefficient=5.0,
        l0_coefficient=0.01,
        jumprelu_bandwidth=SAELENS_JUMPRELU,
        jumprelu_init_threshold=SAELENS_JUMPRELU,
        adam_beta1=0.9,
        adam_beta2=0.999,
        grad_clip=1.0,
        dead_feature_window=128_000,  # SAELens: 1,000 steps of 128 tokens
        checkpoint_every=10_000,
        log_every=100,
    ),
    # A useful SAE on a 2-core CPU in minutes. Tuned on 380k FAST tokens of SmolLM2 layer 15 (first token
    # excluded), held-out explained variance / L0 of a 576x4608 standard SAE: batch 4096, L1 5: 0.32 / 311;
    # batch 1024, L1 5: 0.27 / 6 (20% dead); batch 1024, L1 2: 0.75 / 73 (none dead).
    # JumpReLU: at CPU budgets (~150 steps) the threshold barely moves from its start (Adam steps of ~lr in
    # log space), so the start sets L0: 150k tokens, 576x4608, held-out EV / L0: threshold 0.001 -> ~0.94 /
    # 700 (dense); 0.1 (bandwidth 0.05) -> 0.84 / 400; 0.5 (bandwidth 0.1) -> 0.73 / 123, for L0 coefficients
    # 0.5 and 2 alike (a standard SAE with L1 2 reached 0.44 / 110 on the same tokens).
    "default": dict(
        total_tokens=1_000_000,
        batch_size=1024,
        lr=4e-4,
        lr_end=4e-5,
        lr_warmup_fraction=0.01,
        lr_decay_fraction=0.2,
        sparsity_warmup_fraction=0.05,
        l1_coefficient=2.0,
        l0_coefficient=0.01,
        jumprelu_bandwidth=0.1,
        jumprelu_init_threshold=0.5,
        dead_feature_window=200_000,
        checkpoint_every=50,
        log_every=5,
    ),
}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from a preset, with explicit overrides (None values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name], preset=name)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)

"""The settings every generation benchmark on a model shares (`bench steer`, `bench serve`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelBenchConfig:
    """A model, where it runs, and the random SAE steered on it; each benchmark adds its own load."""

    model: str = "default"
    """Model reference."""
    dtype: str = "float32"
    """Model dtype."""
    device: str = "auto"
    """Where the model runs (auto: CUDA when present)."""
    layer: int | None = None
    """Steered layer (default: the middle layer)."""
    d_sae: int = 4608
    """Width of the random SAE."""

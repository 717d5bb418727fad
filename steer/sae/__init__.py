"""SAE architectures behind a name registry: `standard`, `jumprelu`, `topk`."""

from steer.sae import jumprelu, standard, topk  # noqa: F401  (register the architectures)
from steer.sae.base import (
    SAE,
    SAEConfig,
    architectures,
    build_sae,
    dtype_from_name,
    dtype_name,
    non_residual_hook,
    sae_class,
    sae_layer,
)

__all__ = [
    "SAE",
    "SAEConfig",
    "architectures",
    "build_sae",
    "dtype_from_name",
    "dtype_name",
    "non_residual_hook",
    "sae_class",
    "sae_layer",
]

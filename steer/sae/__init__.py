"""SAE architectures behind a name registry: `standard`, `jumprelu`, `topk`, and the transcoders (`transcoder`,
`skip_transcoder`, `jumprelu_transcoder`, `jumprelu_skip_transcoder`), which are loaded, never trained."""

from steer.sae import jumprelu, standard, topk, transcoder  # noqa: F401  (register the architectures)
from steer.sae.base import (
    SAE,
    SAEConfig,
    architectures,
    build_sae,
    dtype_from_name,
    dtype_name,
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
    "sae_class",
    "sae_layer",
]

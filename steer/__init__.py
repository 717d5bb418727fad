"""The steering runtime: SAEs, intervention specs, hooks and the steered model."""

from steer.sae import SAE, SAEConfig, build_sae

__all__ = ["SAE", "SAEConfig", "build_sae"]

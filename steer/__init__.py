"""The steering runtime: SAEs, intervention specs, hooks and the steered model."""

from steer.positions import SpecialTokens, resolve_special_tokens
from steer.sae import SAE, SAEConfig, build_sae
from steer.spec import Edit, Intervention, SpecError, load_interventions
from steer.steered_model import SteeredModel

__all__ = [
    "SAE",
    "Edit",
    "Intervention",
    "SAEConfig",
    "SpecError",
    "SpecialTokens",
    "SteeredModel",
    "build_sae",
    "load_interventions",
    "resolve_special_tokens",
]

"""The steering runtime: SAEs, intervention specs, hooks and the steered model."""

from steer.errors import ConfigError, FastSteerError, MissingFileError, OutputExistsError
from steer.hooks import SteeringReport
from steer.positions import SpecialTokens, resolve_special_tokens
from steer.sae import SAE, SAEConfig, build_sae
from steer.spec import Edit, Intervention, SpecError, load_interventions
from steer.steered_model import SteeredModel

__all__ = [
    "SAE",
    "ConfigError",
    "Edit",
    "FastSteerError",
    "Intervention",
    "MissingFileError",
    "OutputExistsError",
    "SAEConfig",
    "SpecError",
    "SpecialTokens",
    "SteeredModel",
    "SteeringReport",
    "build_sae",
    "load_interventions",
    "resolve_special_tokens",
]

"""Artifacts that persist or move: models, SAE folders, the Hugging Face Hub."""

from hub.model import (
    LoadedModel,
    ModelResolutionError,
    describe_model,
    fast_dtype,
    load_model,
    resolve_device,
)
from hub.remote import HubUnavailableError
from hub.sae_io import list_sae_ids, load_sae, sae_layer, sae_metadata, save_sae
from hub.validate import SAEFormatError

__all__ = [
    "HubUnavailableError",
    "LoadedModel",
    "ModelResolutionError",
    "SAEFormatError",
    "describe_model",
    "fast_dtype",
    "list_sae_ids",
    "load_model",
    "load_sae",
    "resolve_device",
    "sae_layer",
    "sae_metadata",
    "save_sae",
]

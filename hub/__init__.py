"""Artifacts that persist or move: models, SAE folders, the Hugging Face Hub."""

from hub.device_map import DeviceMap
from hub.model import (
    LoadedModel,
    ModelResolutionError,
    describe_device,
    describe_model,
    fast_dtype,
    library_versions,
    load_model,
    resolve_device,
    resolve_dtype,
)
from hub.remote import HubUnavailableError
from hub.sae_io import list_sae_ids, load_sae, sae_layer, sae_metadata, save_sae
from hub.validate import SAEFormatError

__all__ = [
    "DeviceMap",
    "HubUnavailableError",
    "LoadedModel",
    "ModelResolutionError",
    "SAEFormatError",
    "describe_device",
    "describe_model",
    "fast_dtype",
    "library_versions",
    "list_sae_ids",
    "load_model",
    "load_sae",
    "resolve_device",
    "resolve_dtype",
    "sae_layer",
    "sae_metadata",
    "save_sae",
]

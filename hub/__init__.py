"""Artifacts that persist or move: models, SAE folders, the Hugging Face Hub."""

from hub.model import LoadedModel, ModelResolutionError, describe_model, load_model

__all__ = ["LoadedModel", "ModelResolutionError", "describe_model", "load_model"]

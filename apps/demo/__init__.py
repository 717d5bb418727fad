"""The Gradio demo: chat with a model plain and steered through SAE features, side by side."""

from apps.demo.app import build_app, launch_app
from apps.demo.backend import DemoBackend, DemoSAE, TopFeature
from apps.demo.edits import EditRow
from apps.demo.settings import DemoInputError, DemoLimits, GenerationSettings

__all__ = [
    "DemoBackend",
    "DemoInputError",
    "DemoLimits",
    "DemoSAE",
    "EditRow",
    "GenerationSettings",
    "TopFeature",
    "build_app",
    "launch_app",
]

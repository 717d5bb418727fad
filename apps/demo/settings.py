"""Sampling settings shared by every chat pane, and the safety limits the demo enforces."""

from __future__ import annotations

from dataclasses import dataclass

from apps.evaluation.primitives import strength_of
from apps.limits import RequestLimits
from steer.errors import ConfigError, FastSteerError


class DemoInputError(FastSteerError, ValueError):
    """Input from the page (or the API) that the demo refuses, with a message meant for the user."""


@dataclass(frozen=True)
class DemoLimits(RequestLimits):
    """What one request may ask for (the shared `RequestLimits`, plus the page's own). The demo applies
    these to the page and to API calls alike."""

    max_message_chars: int = 4000
    max_edits: int = 16
    # |strength| <= 100 x this: an `add` edit adds at most this x the layer's strength-scale norm R
    strength_norm_multiple: float = 4.0
    concurrency: int = 1
    max_queue: int = 32
    max_search_chars: int = 200  # longest query of the feature search (by label)
    max_search_results: int = 20  # rows the feature search shows

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strength_norm_multiple <= 0:
            raise ConfigError(f"strength_norm_multiple must be positive, got {self.strength_norm_multiple}")

    def max_strength(self) -> float:
        """The largest |strength| accepted, on the study's scale (`apps.evaluation.primitives`: strength s
        adds s/100 x R), so the same at every layer."""
        return round(strength_of(self.strength_norm_multiple, 1.0), 1)  # adds strength_norm_multiple x R


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings; every pane uses the same ones and the same seed. temperature 0 = greedy."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 96
    seed: int = 0

    def validate(self, limits: DemoLimits) -> GenerationSettings:
        """This object, or a DemoInputError naming the setting that is out of range."""
        if not 0.0 <= self.temperature <= 2.0:
            raise DemoInputError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise DemoInputError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise DemoInputError(
                f"max new tokens must be between 1 and {limits.max_new_tokens}, got {self.max_new_tokens}"
            )
        if not 0 <= self.seed < 2**32:
            raise DemoInputError(f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        return self

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `generate` (sampling off at temperature 0)."""
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": int(self.max_new_tokens)}
        return {
            "do_sample": True,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "max_new_tokens": int(self.max_new_tokens),
        }

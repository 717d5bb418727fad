"""Sampling settings shared by every chat pane, and the safety limits the server enforces."""

from __future__ import annotations

from dataclasses import dataclass

OPS = ("add", "scale", "set", "ablate")
POSITIONS = ("special", "all", "prompt", "generated")


class DemoInputError(ValueError):
    """Input from the page (or the API) that the demo refuses, with a message meant for the user."""


@dataclass(frozen=True)
class DemoLimits:
    """What one request may ask for. The server applies these to the page and to API calls alike."""

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 256
    max_message_chars: int = 4000
    max_edits: int = 16
    strength_norm_multiple: float = 4.0  # |strength| <= this x the layer's typical residual norm
    concurrency: int = 1
    max_queue: int = 32

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_new_tokens", "max_message_chars", "max_edits", "concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DemoLimits.{name} must be positive, got {getattr(self, name)}")
        if self.strength_norm_multiple <= 0:
            raise ValueError(f"strength_norm_multiple must be positive, got {self.strength_norm_multiple}")

    def max_strength(self, residual_norm: float) -> float:
        """The largest |strength| accepted at a layer whose typical residual norm is `residual_norm`."""
        return round(max(self.strength_norm_multiple * residual_norm, 1.0), 1)


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

"""What one generation request may ask for: the limits the server (`apps.serve`) and the demo (`apps.demo`)
both enforce, defined once. Each surface extends them with its own (batching, queue, page input)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from steer.errors import ConfigError


@dataclass(frozen=True)
class RequestLimits:
    """The size of one request: its prompt and its reply. Every integer limit must be positive."""

    max_prompt_tokens: int = 2048  # longest prompt (the conversation after the chat template), in tokens
    max_new_tokens: int = 256  # most new tokens one reply may ask for

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ConfigError(f"{type(self).__name__}.{item.name} must be positive, got {value}")

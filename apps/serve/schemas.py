"""Request bodies of the OpenAI endpoints (pydantic, unknown fields refused) and the server's limits."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from apps.limits import RequestLimits
from apps.serve.errors import APIError
from apps.serve.sampling import SamplingParams
from steer.errors import ConfigError

MAX_STOP_SEQUENCES = 4
SteeringField = dict[str, Any] | list[dict[str, Any]] | None


@dataclass(frozen=True)
class Limits(RequestLimits):
    """What one request (the shared `RequestLimits`), and the server as a whole, may ask for. Each has a
    `fast-steer serve` flag of the same name (`max_edits_per_spec` is `--max-edits-per-spec`)."""

    max_batch: int = 8  # rows per batch
    max_queue: int = 64  # waiting requests; more get 429
    max_body_bytes: int = 1_000_000  # a larger body gets 413
    max_search_query_chars: int = 200  # longest `q` of a feature search
    max_search_limit: int = 100  # most results one feature search may ask for
    max_edits_per_spec: int = 64  # edits in one intervention of a request's `steering`
    max_specs_per_request: int = 8  # interventions in one request's `steering` list
    max_stop_chars: int = 256  # longest stop string, in characters
    max_prompts: int = 8  # prompts in one /v1/completions `prompt` list
    max_messages: int = 256  # messages in one chat request
    max_compiled_bytes: int = 256 * 2**20  # tensor bytes of the compiled specs kept for reuse
    request_timeout: float = 600.0  # seconds a request may take in all (queue and generation); then 504

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.request_timeout > 0:
            raise ConfigError(f"Limits.request_timeout must be positive, got {self.request_timeout}")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationRequest(_Body):
    """Fields shared by chat and text completions, plus fast-steer's `steering` and `compare`."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # as vLLM: no end of turn before this many tokens (fixed-length benches)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    steering: SteeringField = None
    compare: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @property
    def steering_given(self) -> bool:
        """Whether the body has a `steering` field (null included); omitted means the server's default."""
        return "steering" in self.model_fields_set

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def new_tokens(self, limits: Limits) -> tuple[int, str]:
        """The requested number of new tokens (default: the server's limit) and the field that set it."""
        return self.max_tokens or limits.max_new_tokens, "max_tokens"

    def sampling(self, limits: Limits, n_logprobs: int | None) -> SamplingParams:
        """Checked sampling settings of this request (400 naming the field when over a limit)."""
        n_new, field = self.new_tokens(limits)
        if n_new > limits.max_new_tokens:
            raise APIError.bad_request(
                f"{field}={n_new} is more than this server allows ({limits.max_new_tokens} new tokens, "
                "--max-new-tokens)",
                field,
            )
        for i, stop in enumerate(self.stop):
            if len(stop) > limits.max_stop_chars:
                raise APIError.over_limit(
                    f"the length of stop[{i}]", len(stop), limits.max_stop_chars, "--max-stop-chars", "stop"
                )
        if self.min_tokens > n_new:
            raise APIError.bad_request(
                f"min_tokens={self.min_tokens} is more than {field}={n_new}", "min_tokens"
            )
        return SamplingParams(
            max_new_tokens=n_new,
            min_new_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed if self.seed is not None else secrets.randbits(63),
            stop=tuple(self.stop),
            logprobs=n_logprobs,
        )


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """`{"role", "content"}` for the chat template (`developer` is a system turn, text parts joined)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def new_tokens(self, limits: Limits) -> tuple[int, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return super().new_tokens(limits)

    def n_logprobs(self) -> int | None:
        """How many alternatives per token to report (None: no logprobs)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError.bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, value: str | list[str]) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts or any(not p for p in prompts):
            raise ValueError("give a non-empty prompt string (or a list of them)")
        return prompts


class SteeringUpdate(_Body):
    """`PUT /v1/steering`: the new default spec (null: plain)."""

    steering: SteeringField

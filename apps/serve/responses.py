"""OpenAI response bodies and stream chunks for chat and text completions, built from row events."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from apps.serve.rows import INCOMPLETE_CHAR, LogprobEntry


@dataclass
class Choice:
    """What one row has produced so far (a reply, or a labelled half of a comparison)."""

    index: int
    label: str | None
    prompt_index: int
    prompt_tokens: int
    text: str = ""
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    steered_positions: int | None = None  # positions its spec edited (None: a plain row)


class ResponseFormat:
    """Chat completions (`chat.completion`, message / delta) or text completions (`text_completion`)."""

    def __init__(self, chat: bool, model: str, want_logprobs: bool) -> None:
        self.chat, self.model, self.want_logprobs = chat, model, want_logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.model,
        }

    def _logprobs(self, entries: list[LogprobEntry]) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {
                "content": [
                    {**_token(e.token, e.logprob), "top_logprobs": [_token(t, lp) for t, lp in e.top]}
                    for e in entries
                ]
            }
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries],
            "text_offset": [e.offset for e in entries],
        }

    def _choice(
        self, c: Choice, text: str, entries: list[LogprobEntry], chunk: bool, first: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"index": c.index}
        if self.chat and chunk:
            out["delta"] = ({"role": "assistant"} if first else {}) | (
                {"content": text} if text or first else {}
            )
        elif self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        out["logprobs"] = self._logprobs(entries)
        out["finish_reason"] = c.finish_reason
        if c.label is not None:
            out["label"] = c.label
        return out

    def body(self, choices: list[Choice], steering: list | None) -> dict[str, Any]:
        """The whole response of a request that did not stream."""
        return self._envelope(False) | {
            "choices": [self._choice(c, c.text, c.logprobs, False, False) for c in choices],
            "usage": usage(choices),
            "steering": steering,
        }

    def chunk(self, c: Choice, text: str, entries: list[LogprobEntry], first: bool) -> str:
        """One server-sent event with one choice's new text (and its finish reason once it is done)."""
        return sse(self._envelope(True) | {"choices": [self._choice(c, text, entries, True, first)]})

    def usage_chunk(self, choices: list[Choice]) -> str:
        return sse(self._envelope(True) | {"choices": [], "usage": usage(choices)})


def usage(choices: list[Choice]) -> dict[str, int]:
    """Token counts: each distinct prompt once (a comparison's two rows share theirs), every reply; with
    steering, `steered_positions`: the positions the specs edited in the steered rows (0 says the spec
    matched nothing, e.g. `special` positions in a prompt without the chat template)."""
    prompts = {c.prompt_index: c.prompt_tokens for c in choices}
    prompt, completion = sum(prompts.values()), sum(c.completion_tokens for c in choices)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    steered = [c.steered_positions for c in choices if c.steered_positions is not None]
    if steered:
        out["steered_positions"] = sum(steered)
    return out


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _token(text: str, logprob: float) -> dict[str, Any]:
    """A chat logprob entry; `bytes` is null for a token that holds part of a character (text U+FFFD)."""
    raw = None if INCOMPLETE_CHAR in text else list(text.encode("utf-8"))
    return {"token": text, "logprob": logprob, "bytes": raw}

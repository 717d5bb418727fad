"""One row of a batch: what a client asked for, and its generated tokens turned into text events.

A row's events go to its `sink` (called from the engine's thread): `Delta`s of new text (with logprobs),
then one `Finish`, or a `Failure`. Text that could still become a stop string, or a character whose bytes
are not all generated yet, is held back until it is certain.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from apps.serve.sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from apps.serve.steering import RowSpec

INCOMPLETE_CHAR = "\ufffd"


@dataclass(frozen=True)
class LogprobEntry:
    """A generated token's text, where it starts in the reply, log-probability and the top alternatives."""

    token: str
    offset: int
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[LogprobEntry, ...] = ()


@dataclass(frozen=True)
class Finish:
    """`reason`: stop (end of turn or a stop string), length (max tokens) or cancelled (client gone);
    `steered_positions`: the positions the row's spec edited (None for a plain row)."""

    reason: str
    completion_tokens: int
    steered_positions: int | None = None


@dataclass(frozen=True)
class Failure:
    """Why a row ended without a reply, as its client is told, and the HTTP status of that (400: the
    request's own fault, 500: a bug, 503: the engine stopped)."""

    message: str
    status: int = 500


Event = Delta | Finish | Failure


@dataclass
class Row:
    """One sequence to generate: prompt ids, sampling, steering (None: plain) and where its events go."""

    prompt: list[int]
    params: SamplingParams
    steering: RowSpec | None
    sink: Callable[[Event], None]
    cancel: threading.Event = field(default_factory=threading.Event)


class RowDecoder:
    """Follows one row's generated tokens: text deltas, stop strings, max tokens, end of turn."""

    def __init__(self, row: Row, tokenizer, eos_ids: frozenset[int]) -> None:
        self.row = row
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already sent
        self.pending: list[tuple[int, int, LogprobEntry]] = []  # (start, end, entry) not yet sent
        self.hold = max((len(s) for s in row.params.stop), default=1) - 1
        self.reason: str | None = None  # set once finished: stop, length, cancelled or failed
        # the positions the row's spec has edited so far (`SteeringReport.row`; set by the engine on a
        # steered row), read once, when the row finishes
        self.count_steered: Callable[[], int] | None = None
        self.steered_positions: int | None = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def push(self, token: int, logprob: TokenLogprob | None) -> None:
        """Take the row's next token; send what is certain; finish on end of turn, a stop string or length."""
        self.tokens.append(token)
        if token in self.eos_ids:
            self._finish("stop", len(self.text))
            return
        start = len(self.text)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if logprob is not None:
            self.pending.append((start, len(self.text), self._entry(token, start, logprob)))
        cut = min(
            (i for i in (self.text.find(s, max(0, start - len(s))) for s in self.row.params.stop) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self._finish("stop", cut)
        elif len(self.tokens) >= self.row.params.max_new_tokens:
            self._finish("length", len(self.text))
        else:
            safe = len(self.text) - self.hold
            while safe > self.sent and self.text[safe - 1] == INCOMPLETE_CHAR:
                safe -= 1
            self._send(safe, lambda start, end: end <= safe)

    def cancel(self) -> None:
        self.reason = "cancelled"
        self.row.sink(Finish(self.reason, len(self.tokens), self._steered()))

    def fail(self, failure: Failure) -> None:
        self.reason = "failed"
        self.row.sink(failure)

    def _finish(self, reason: str, cut: int) -> None:
        self._send(cut, lambda start, end: start < cut)
        self.reason = reason
        self.row.sink(Finish(reason, len(self.tokens), self._steered()))

    def _steered(self) -> int | None:
        if self.count_steered is not None:
            self.steered_positions = self.count_steered()
        return self.steered_positions

    def _send(self, upto: int, ready: Callable[[int, int], bool]) -> None:
        entries = tuple(e for s, end, e in self.pending if ready(s, end))
        self.pending = [p for p in self.pending if not ready(p[0], p[1])]
        if upto > self.sent or entries:
            self.row.sink(Delta(self.text[self.sent : max(upto, self.sent)], entries))
            self.sent = max(upto, self.sent)

    def _entry(self, token: int, offset: int, logprob: TokenLogprob) -> LogprobEntry:
        top = tuple((self.tokenizer.decode([t]), lp) for t, lp in logprob.top)
        return LogprobEntry(self.tokenizer.decode([token]), offset, logprob.logprob, top)

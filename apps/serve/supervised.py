"""What every serving engine shares: a bounded queue of requests, counters, and a supervised worker thread.

An engine takes requests (groups of `Row`s that run together, e.g. a steered/plain comparison) with `submit`,
refusing at once when `max_queue` are waiting (`QueueFull`); nothing waits for room. Its worker thread
(`_serve`, per engine) runs them and sends each row's events to the row's sink. A supervisor thread runs the
worker thread: if it dies, the rows in flight and in the queue fail with 503, `down` says why (`/health`
answers 503 with it), new requests get `EngineDown` at once, and a fresh worker starts after `restart_delay`
seconds. A client is told a bug's error id, never its text (the traceback is logged under that id); a
`FastSteerError` (what the user asked for) keeps its message.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from apps.serve.errors import log_internal
from apps.serve.rows import Failure, Row, RowDecoder
from steer import FastSteerError

RESTART_DELAY = 1.0  # seconds between the worker thread's death and its replacement
UNSET_MAX_LENGTH = 10**9  # a tokenizer's model_max_length above this is transformers' "not set"


class QueueFull(Exception):
    """The engine's queue already holds `max_queue` requests."""


class EngineDown(Exception):
    """The worker thread died and has not been replaced yet; the message says why."""


def context_length(model, tokenizer) -> int | None:
    """The positions the model can attend to: its config's `max_position_embeddings` (GPT-2's `n_positions`),
    else the tokenizer's `model_max_length` when it sets one; None when neither says."""
    n = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < UNSET_MAX_LENGTH else None


def bug_failure(what: str, exc: BaseException) -> Failure:
    """What a client is told of an exception: a `FastSteerError`'s own message (400), else a logged error id."""
    if isinstance(exc, FastSteerError):
        return Failure(f"generation failed: {exc}", 400)
    return Failure(f"internal error, id {log_internal(what, exc)} (see the server log)")


def end_of_turn_ids(generation_eos, tokenizer) -> frozenset[int]:
    """The ids that end a reply: the generation config's `eos_token_id` (one or several) and the tokenizer's."""
    eos = (
        []
        if generation_eos is None
        else [generation_eos]
        if isinstance(generation_eos, int)
        else list(generation_eos)
    )
    return frozenset([*eos, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])])


@dataclass
class EngineStats:
    """Counters since start (what `/health` reports)."""

    queued: int = 0
    running: int = 0
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    generated_tokens: int = 0
    cancelled_rows: int = 0
    failed_rows: int = 0
    refused: int = 0
    steered_positions: int = 0  # positions edited by the specs of finished rows
    restarts: int = 0  # workers replaced after the previous one died


class SupervisedEngine:
    """The queue, counters and supervised worker thread of an engine; a subclass runs the rows (`_serve`)."""

    def __init__(self, *, max_batch: int, max_queue: int, context: int | None, restart_delay: float) -> None:
        """`max_batch` rows per batch and `max_queue` waiting requests (`Limits`); `context`: the positions the
        model can attend to (None: unknown); `restart_delay` seconds before a dead worker is replaced."""
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        self.restart_delay = restart_delay
        self._queue: deque[list[Row]] = deque()
        self._wake = threading.Condition()
        self._stats = EngineStats()
        self._stopping = False
        self._down: str | None = None  # why the worker is dead, until its replacement starts
        self._death: BaseException | None = None
        self._supervisor = threading.Thread(target=self._supervise, name="fast-steer-supervisor", daemon=True)

    # -- the asyncio side ------------------------------------------------------------------------
    def start(self) -> SupervisedEngine:
        self._supervisor.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._supervisor.join()

    @property
    def down(self) -> str | None:
        """Why the engine cannot take requests now (its worker died and is being replaced), or None."""
        with self._wake:
            return self._down

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue `rows` to run in one batch; `QueueFull` at once when `max_queue` requests are waiting,
        `EngineDown` while the worker is being replaced."""
        if len(rows) > self.max_batch:
            raise ValueError(f"a request of {len(rows)} rows cannot fit a batch of {self.max_batch}")
        with self._wake:
            if self._down is not None:
                raise EngineDown(self._down)
            if len(self._queue) >= self.max_queue:
                self._stats.refused += 1
                raise QueueFull(
                    f"the queue is full ({self.max_queue} requests waiting, --max-queue); retry later"
                )
            self._queue.append(list(rows))
            self._wake.notify()

    def stats(self) -> dict:
        with self._wake:
            return asdict(self._stats) | {"queued": len(self._queue)}

    # -- the supervisor thread ---------------------------------------------------------------------
    def _supervise(self) -> None:
        """Run the worker thread; when it dies, fail what it held, refuse requests, and replace it."""
        while True:
            worker = threading.Thread(target=self._work, name="fast-steer-engine", daemon=True)
            worker.start()
            worker.join()
            with self._wake:
                if self._stopping:
                    return
            death = self._death or RuntimeError("the engine thread ended")
            self._death = None
            error_id = log_internal("the engine thread died", death)
            reason = (
                f"the engine thread died ({type(death).__name__}, error id {error_id}); "
                f"a new one starts in {self.restart_delay:g} s"
            )
            with self._wake:
                self._down = reason
                self._stats.restarts += 1
                self._stats.running = 0
                queued = [row for rows in self._queue for row in rows]
                self._queue.clear()
            failure = Failure(f"{reason}: retry then", 503)
            for decoder in self._in_flight():
                if not decoder.done:
                    decoder.fail(failure)
            for row in queued:
                row.sink(failure)
            self._forget_in_flight()
            with self._wake:
                self._wake.wait_for(lambda: self._stopping, timeout=self.restart_delay)
                if self._stopping:
                    return
                self._down = None

    # -- the worker thread -------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - the supervisor reports it and starts a new worker
            self._death = exc

    def _serve(self) -> None:
        """Run queued rows until `_stopping` (in the worker thread); raising kills the worker."""
        raise NotImplementedError

    def _in_flight(self) -> list[RowDecoder]:
        """The rows the worker is running (failed with 503 if it dies)."""
        raise NotImplementedError

    def _forget_in_flight(self) -> None:
        """Drop the rows of a dead worker."""
        raise NotImplementedError

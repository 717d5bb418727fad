"""The batching engine: windowed static batching of rows with different specs and sampling settings.

One worker thread owns the model. It waits for a request, collects more for `window` seconds (up to
`max_batch` rows), left-pads them into one batch and runs one `generate` inside nested
`SteeredModel.steer(spec, rows=...)` blocks, one per distinct spec (rows without a spec run the plain
model bit for bit). A logits processor chooses each row's token with that row's own sampler, so a greedy
row's reply is what it would be alone wherever the plain model is batch-invariant; a stopping criterion
ends rows one by one (end of turn, stop string, max tokens, a client that went away) while the others go on.
A full queue refuses at once (`QueueFull`); nothing waits for room.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from apps.serve.rows import Row, RowDecoder
from apps.serve.sampling import RowSampler
from steer import FastSteerError, SteeredModel
from steer.positions import pad_token_id

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue already holds `max_queue` requests."""


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
    refused: int = 0


class _Chooser(LogitsProcessor):
    """Each unfinished row's token from its own sampler; -inf elsewhere, so greedy `generate` takes it."""

    def __init__(
        self, decoders: list[RowDecoder], samplers: list[RowSampler], eos_ids: frozenset[int]
    ) -> None:
        self.decoders, self.samplers = decoders, samplers
        self.eos_ids = sorted(eos_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        young = [
            i
            for i, d in enumerate(self.decoders)
            if not d.done and len(d.tokens) < d.row.params.min_new_tokens
        ]
        if young:  # no end of turn before min_tokens
            scores = scores.clone()
            scores[torch.tensor(young)[:, None], torch.tensor(self.eos_ids)] = float("-inf")
        best = scores.argmax(dim=-1).tolist()  # one device sync per step for every greedy row
        tokens = []
        for i, (decoder, sampler) in enumerate(zip(self.decoders, self.samplers, strict=True)):
            token = 0
            if not decoder.done:
                token, logprob = sampler.choose(scores[i], best[i])
                decoder.push(token, logprob)
            tokens.append(token)
        index = torch.tensor(tokens, device=scores.device)[:, None]
        return torch.full_like(scores, float("-inf")).scatter_(1, index, 0.0)


class _Finished(StoppingCriteria):
    """Which rows are done; a row whose client went away is cancelled here."""

    def __init__(self, decoders: list[RowDecoder], pad_id: int) -> None:
        self.decoders = decoders
        self.eos_token_id = pad_id  # with this attribute, generate pads the rows that finished

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        for decoder in self.decoders:
            if not decoder.done and decoder.row.cancel.is_set():
                decoder.cancel()
        return torch.tensor([d.done for d in self.decoders], dtype=torch.bool, device=input_ids.device)


class Engine:
    """Runs queued requests (groups of rows that share one batch, e.g. a steered/plain comparison)."""

    def __init__(self, sm: SteeredModel, *, max_batch: int, max_queue: int, window: float) -> None:
        """`max_batch` rows per batch and `max_queue` waiting requests (`Limits`); `window` seconds of waiting."""
        self.sm = sm
        self.max_batch, self.max_queue, self.window = max_batch, max_queue, window
        # A copy for decoding in this thread while the app's thread encodes prompts with the original
        # (a Rust tokenizer refuses to be borrowed by two threads at once when one changes its settings).
        self.tokenizer = tokenizer = copy.deepcopy(sm.tokenizer)
        eos = sm.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_ids = frozenset(
            [*eos, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])]
        )
        self.pad_id = pad_token_id(tokenizer)
        self._queue: deque[list[Row]] = deque()
        self._wake = threading.Condition()
        self._stats = EngineStats()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="fast-steer-engine", daemon=True)

    # -- the asyncio side ------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join()

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue `rows` to run in one batch; `QueueFull` at once when `max_queue` requests are waiting."""
        if len(rows) > self.max_batch:
            raise ValueError(f"a request of {len(rows)} rows cannot fit a batch of {self.max_batch}")
        with self._wake:
            if len(self._queue) >= self.max_queue:
                self._stats.refused += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(list(rows))
            self._wake.notify()

    def stats(self) -> dict:
        with self._wake:
            return asdict(self._stats) | {"queued": len(self._queue)}

    # -- the worker thread -------------------------------------------------------------------------
    def _work(self) -> None:
        while self._run_next_batch():
            pass

    def _run_next_batch(self) -> bool:
        """Run one batch (False once stopped); its rows are dropped on return, so nothing outlives a batch."""
        rows = self._next_batch()
        if rows is None:
            return False
        decoders = [RowDecoder(r, self.tokenizer, self.eos_ids) for r in rows]
        try:
            if rows:
                self._generate(decoders)
        except Exception as exc:  # noqa: BLE001 - reported to every client of the batch, then go on
            log.exception("batch of %d rows failed", len(rows))
            # a FastSteerError says what was wrong; any other text is a bug's, kept for the server log
            said = str(exc) if isinstance(exc, FastSteerError) else "internal error (see the server log)"
            for decoder in decoders:
                if not decoder.done:
                    decoder.fail(f"generation failed: {said}")
        with self._wake:
            s = self._stats
            s.running = 0
            s.batches += bool(rows)
            s.rows += len(rows)
            s.largest_batch = max(s.largest_batch, len(rows))
            s.generated_tokens += sum(len(d.tokens) for d in decoders)
            s.cancelled_rows += sum(d.reason == "cancelled" for d in decoders)
        return True

    def _next_batch(self) -> list[Row] | None:
        """The next batch: the oldest request, plus whatever else fits and arrives within the window."""
        with self._wake:
            while not self._queue and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return None
            rows = self._queue.popleft()
            deadline = time.monotonic() + self.window
            while len(rows) < self.max_batch and not self._stopping:
                if self._queue:
                    if len(rows) + len(self._queue[0]) > self.max_batch:
                        break
                    rows += self._queue.popleft()
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            self._stats.cancelled_rows += sum(r.cancel.is_set() for r in rows)
            rows = [r for r in rows if not r.cancel.is_set()]  # their clients went away while queued
            self._stats.running = len(rows)
        return rows

    def _generate(self, decoders: list[RowDecoder]) -> None:
        """One left-padded `generate` over the rows, each under its own spec (or none)."""
        sm = self.sm
        rows = [d.row for d in decoders]
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        groups: dict[str, tuple] = {}
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
            if row.steering is not None:
                groups.setdefault(row.steering.key, (row.steering.compiled, []))[1].append(i)
        config = GenerationConfig(
            max_new_tokens=max(r.params.max_new_tokens for r in rows),
            do_sample=False,
            pad_token_id=self.pad_id,
            bos_token_id=sm.model.generation_config.bos_token_id,
        )
        samplers = [RowSampler(r.params, sm.device) for r in rows]
        with ExitStack() as stack:
            for compiled, indices in groups.values():
                stack.enter_context(sm.steer(compiled, rows=indices))
            with torch.inference_mode():
                sm.generate(
                    input_ids=ids.to(sm.device),
                    attention_mask=mask.to(sm.device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList([_Chooser(decoders, samplers, self.eos_ids)]),
                    stopping_criteria=StoppingCriteriaList([_Finished(decoders, self.pad_id)]),
                )
        for decoder in decoders:
            if not decoder.done:  # every row ends by our criterion; say so loudly if one did not
                decoder.fail("generation ended before this row finished")

"""The batching engine: windowed static batching of rows with different specs and sampling settings.

One worker thread owns the model. It waits for a request, collects more for `window` seconds (up to
`max_batch` rows), left-pads them into one batch and runs one `generate` inside nested
`SteeredModel.steer(spec, rows=...)` blocks, one per distinct spec (rows without a spec run the plain
model bit for bit). A logits processor chooses each row's token with that row's own sampler, so a greedy
row's reply is what it would be alone wherever the plain model is batch-invariant; a stopping criterion
ends rows one by one (end of turn, stop string, max tokens, a client that went away) while the others go on.

Faults stay with their row: an exception while choosing or decoding one row's token fails that row only,
and when a whole batch fails (its forward pass), the rows that have sent nothing yet are run again one by
one, so only the row that causes it fails. `fault`, a callable run on each row before each of its tokens,
lets tests and the soak bench make a row raise. The queue, the counters and the supervision of the worker
thread are `apps.serve.supervised`'s.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from apps.serve.rows import Failure, Row, RowDecoder
from apps.serve.sampling import RowSampler
from apps.serve.supervised import (
    RESTART_DELAY,
    EngineDown,
    EngineStats,
    QueueFull,
    SupervisedEngine,
    bug_failure,
    context_length,
    end_of_turn_ids,
)
from steer import SteeredModel
from steer.positions import pad_token_id

__all__ = ["RESTART_DELAY", "Engine", "EngineDown", "EngineStats", "Fault", "QueueFull", "context_length"]

log = logging.getLogger(__name__)

Fault = Callable[[Row], None]


class _Chooser(LogitsProcessor):
    """Each unfinished row's token from its own sampler; -inf elsewhere, so greedy `generate` takes it."""

    def __init__(
        self,
        decoders: list[RowDecoder],
        samplers: list[RowSampler],
        eos_ids: frozenset[int],
        fault: Fault | None,
    ) -> None:
        self.decoders, self.samplers, self.fault = decoders, samplers, fault
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
                try:
                    if self.fault is not None:
                        self.fault(decoder.row)
                    token, logprob = sampler.choose(scores[i], best[i])
                    decoder.push(token, logprob)
                except Exception as exc:  # noqa: BLE001 - this row fails, its batch-mates go on
                    token = 0
                    decoder.fail(bug_failure(f"row {i} of a batch of {len(self.decoders)} failed", exc))
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


class Engine(SupervisedEngine):
    """Runs queued requests with windowed static batching over HF `generate`."""

    def __init__(
        self,
        sm: SteeredModel,
        *,
        max_batch: int,
        max_queue: int,
        window: float,
        fault: Fault | None = None,
        restart_delay: float = RESTART_DELAY,
    ) -> None:
        """`max_batch` rows per batch and `max_queue` waiting requests (`Limits`); `window` seconds of waiting;
        `fault` (None in production) runs on each row before each token; `restart_delay` seconds before a
        dead worker is replaced."""
        super().__init__(
            max_batch=max_batch,
            max_queue=max_queue,
            context=context_length(sm.model, sm.tokenizer),
            restart_delay=restart_delay,
        )
        self.sm = sm
        self.window, self.fault = window, fault
        # A copy for decoding in this thread while the app's thread encodes prompts with the original
        # (a Rust tokenizer refuses to be borrowed by two threads at once when one changes its settings).
        self.tokenizer = tokenizer = copy.deepcopy(sm.tokenizer)
        self.eos_ids = end_of_turn_ids(sm.model.generation_config.eos_token_id, tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self._current: list[RowDecoder] = []  # the batch in flight

    # -- the worker thread -------------------------------------------------------------------------
    def _serve(self) -> None:
        while self._run_next_batch():
            pass

    def _in_flight(self) -> list[RowDecoder]:
        return self._current

    def _forget_in_flight(self) -> None:
        self._current = []

    def _run_next_batch(self) -> bool:
        """Run one batch (False once stopped); its rows are dropped on return, so nothing outlives a batch."""
        rows = self._next_batch()
        if rows is None:
            return False
        decoders = [RowDecoder(r, self.tokenizer, self.eos_ids) for r in rows]
        self._current = decoders
        if rows:
            decoders = self._run(decoders)
        self._current = []
        with self._wake:
            s = self._stats
            s.running = 0
            s.batches += bool(rows)
            s.rows += len(rows)
            s.largest_batch = max(s.largest_batch, len(rows))
            s.generated_tokens += sum(len(d.tokens) for d in decoders)
            s.cancelled_rows += sum(d.reason == "cancelled" for d in decoders)
            s.failed_rows += sum(d.reason == "failed" for d in decoders)
            s.steered_positions += sum(d.steered_positions or 0 for d in decoders)
        return True

    def _run(self, decoders: list[RowDecoder]) -> list[RowDecoder]:
        """Generate the rows as one batch; if the batch fails as a whole, run each row that has sent nothing
        yet alone (so only a row that causes the failure fails). Returns the decoders of the rows' last runs."""
        try:
            self._generate(decoders)
        except Exception as exc:  # noqa: BLE001 - reported to the rows it reaches, then go on
            unfinished = [d for d in decoders if not d.done]
            retry = [d for d in unfinished if not d.tokens] if len(decoders) > 1 else []
            if len(retry) < len(unfinished):
                failure = bug_failure(f"a batch of {len(decoders)} rows failed", exc)
                for decoder in unfinished:
                    if decoder not in retry:
                        decoder.fail(failure)
            if retry:
                log.warning("a batch of %d rows failed; running %d of them alone", len(decoders), len(retry))
            fresh = [RowDecoder(d.row, self.tokenizer, self.eos_ids) for d in retry]
            decoders = [d for d in decoders if d not in retry] + fresh
            self._current = decoders
            for decoder in fresh:
                self._run([decoder])
        return decoders

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
                report = stack.enter_context(sm.steer(compiled, rows=indices))
                for i in indices:
                    decoders[i].count_steered = functools.partial(report.row, i)
            with torch.inference_mode():
                sm.generate(
                    input_ids=ids.to(sm.device),
                    attention_mask=mask.to(sm.device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList(
                        [_Chooser(decoders, samplers, self.eos_ids, self.fault)]
                    ),
                    stopping_criteria=StoppingCriteriaList([_Finished(decoders, self.pad_id)]),
                )
        for decoder in decoders:
            if not decoder.done:  # every row ends by our criterion; say so loudly if one did not
                decoder.fail(Failure("internal error: generation ended before this row finished"))

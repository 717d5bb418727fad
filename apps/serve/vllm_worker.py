"""The vLLM side of `fast-steer serve --engine vllm`: a worker extension that steers each request by its own spec.

vLLM mixes `FastSteerWorker` into every worker (`worker_extension_cls`); the engine calls its methods by name
through `collective_rpc`. `fast_steer_setup` loads the server's SAEs by name on the worker's device and hooks
the model: a forward pre-hook on the token embedding keeps the step's token ids, one on the first decoder
layer places the step (vLLM calls its base model without `nn.Module` hooks, its layers with them), and a
forward hook on each decoder layer edits.

Placing a step: vLLM flattens the step's requests into rows (`query_start_loc` over `input_batch.req_ids`).
A request is steered when its `SamplingParams.extra_args` carries a payload (`PAYLOAD_KEY`): the checked
specs, as the server compiled them, with position lists as token ids. Each steered row's positions are
chosen from what it is, never from how it was fed: "special" marks come from the request's whole token
history by absolute position (`MarkedSequence`), so chunked prefill, prefix-cache hits and recompute after
preemption mark exactly what one whole forward would; "generated" is a position at or past the prompt's
length, "prompt" one before it. A row's count of edited positions is of distinct positions, as one whole
forward edits them: positions a prefix-cache hit skips count (their KV was edited under the same spec: the
cache salt), positions recomputed after preemption do not count again.

Editing: vLLM's decoder layers return `(hidden, residual)` and the next layer adds them, so the residual
stream is `hidden + residual`; an edit reads that sum and adds its delta to `residual` at the selected rows
only (`index_add`, out of place). The edits are those of the HF runtime (`CompiledIntervention`): `add` adds
`strength * W_dec[k] / ||W_dec[k]||`, `scale/set/ablate` add `(f'_k - f_k) W_dec[k]`, keeping the SAE's error
term. A step with no steered row touches nothing: the pre-hook returns before any tensor is read.

Only residual-stream SAEs (`blocks.L.hook_resid_post`) are steered here; the server refuses others with 400.
The setup refuses what the hooks cannot see: CUDA graphs or compilation (graphs replay no Python hook),
speculative decoding (rows would hold draft tokens), and a model runner without the V1 `input_batch`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from steer.hooks import CompiledIntervention
from steer.positions import MarkedSequence, SpecialTokens
from steer.sae import SAE
from steer.spec import Intervention, load_sae_reference

PAYLOAD_KEY = "fast_steer"  # extra_args: the checked specs (JSON)
ROW_KEY = "fast_steer_row"  # extra_args: the server's id of the row (vLLM adds a suffix to request ids)
COMPILED_KEPT = 64  # compiled payloads kept per worker (least recently used dropped)


class FastSteerWorker:
    """Mixed into each vLLM worker; vLLM gives it `self.model_runner` and `self.device`. Methods return errors
    as text instead of raising, so one failing rank cannot leave the others half set up."""

    def fast_steer_setup(self, config: str) -> dict[str, Any]:
        """Load the SAEs named in `config` (JSON: `saes` name -> reference, `special` automaton) and hook the
        model; {"error": why} when this worker cannot steer correctly."""
        try:
            self.fast_steer = WorkerSteering.install(self.model_runner, json.loads(config))
        except Exception as exc:  # noqa: BLE001 - reported to the server, which refuses to start
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"runner": type(self.model_runner).__name__, "layers": len(self.fast_steer.layers)}

    def fast_steer_counts(self, rows: list[str]) -> dict[str, int]:
        """Positions edited in each of `rows` (the server's row ids; forgotten once read)."""
        return self.fast_steer.pop_counts(rows)


def refusal(runner) -> str | None:
    """Why the hooks cannot steer under this runner's configuration, or None."""
    config = runner.vllm_config
    if not hasattr(runner, "input_batch") or not hasattr(runner, "query_start_loc"):
        return (
            f"the model runner {type(runner).__name__} has no V1 input batch (model runner V2?); "
            "set VLLM_USE_V2_MODEL_RUNNER=0"
        )
    compilation = config.compilation_config
    if compilation.cudagraph_mode.name != "NONE" or compilation.mode.name != "NONE":
        return (
            f"CUDA graphs ({compilation.cudagraph_mode.name}) and torch.compile ({compilation.mode.name}) run "
            "no Python hook; the vLLM engine needs enforce_eager=True"
        )
    if config.speculative_config is not None:
        return "speculative decoding feeds draft tokens the steering cannot place; turn it off"
    if config.parallel_config.pipeline_parallel_size > 1:
        return "pipeline parallelism splits the layers the steering hooks; use tensor parallelism"
    return None


class WorkerSteering:
    """The SAEs, hooks and per-step plan of one worker."""

    def __init__(self, runner, base: nn.Module, saes: dict[str, SAE], special: SpecialTokens | None) -> None:
        self.runner = runner
        self.layers = base.layers
        self.saes = saes
        self.special = special
        self.dtype = runner.model_config.dtype
        self.plan: dict[int, list[tuple[CompiledIntervention, torch.Tensor]]] = {}  # layer -> (spec, rows)
        self.input_ids: torch.Tensor | None = None  # the step's token ids, from the embedding's input
        self.counts: dict[str, int] = {}  # the server's row id -> positions edited
        self.counted_to: dict[str, int] = {}  # the server's row id -> the first position not counted yet
        self.marks: dict[str, MarkedSequence] = {}
        self.compiled: OrderedDict[str, list[CompiledIntervention]] = OrderedDict()

    @classmethod
    def install(cls, runner, config: dict[str, Any]) -> WorkerSteering:
        why = refusal(runner)
        if why is not None:
            raise RuntimeError(why)
        base = runner.get_model().model
        device = runner.device
        saes = {name: load_sae_reference(ref, device=device).eval() for name, ref in config["saes"].items()}
        special = None if config.get("special") is None else SpecialTokens.from_dict(config["special"])
        steering = cls(runner, base, saes, special)
        base.embed_tokens.register_forward_pre_hook(steering.keep_ids)
        steering.layers[0].register_forward_pre_hook(steering.place)
        for index, layer in enumerate(steering.layers):
            layer.register_forward_hook(steering.edit_hook(index))
        return steering

    # -- per step ------------------------------------------------------------------------------
    def keep_ids(self, module: nn.Module, args: tuple) -> None:
        self.input_ids = args[0]

    def place(self, module: nn.Module, args: tuple) -> None:
        """Work out which rows each steered request's specs edit in this step (nothing when none is steered);
        the first layer's inputs are `(positions, hidden, residual)`."""
        self.plan = {}
        input_ids, self.input_ids = self.input_ids, None
        runner = self.runner
        batch = runner.input_batch
        n = batch.num_reqs
        steered = []
        for i, request_id in enumerate(batch.req_ids[:n]):
            params = runner.requests[request_id].sampling_params
            extra = None if params is None else params.extra_args
            if extra and PAYLOAD_KEY in extra:
                steered.append((i, request_id, extra[PAYLOAD_KEY], extra[ROW_KEY]))
        self._forget(runner.requests)
        if not steered:
            return
        if input_ids is None:
            raise RuntimeError("the step's token ids were not seen (the model was fed embeddings)")
        ids, where = input_ids.tolist(), args[0].tolist()
        starts = runner.query_start_loc.np
        chosen: dict[str, tuple] = {}  # payload -> (its specs, the rows each edits): one edit per spec
        for i, request_id, payload, row in steered:
            state = runner.requests[request_id]
            rows = range(int(starts[i]), int(starts[i + 1]))
            row_positions = [where[r] for r in rows]
            row_ids = [ids[r] for r in rows]
            special = None
            items = self._compile(payload)
            lists = chosen.setdefault(payload, (items, [[] for _ in items]))[1]
            for item, into in zip(items, lists, strict=True):
                if item.positions == "special" and special is None:
                    special = self._marks(request_id, state, row_positions, row_ids)
                picked = [
                    r
                    for k, r in enumerate(rows)
                    if selects(
                        item.positions, row_positions[k], row_ids[k], state.num_prompt_tokens, special, k
                    )
                ]
                into.extend(picked)
            self._count(row, request_id, state, items, row_positions, row_ids)
        for items, lists in chosen.values():
            for item, picked in zip(items, lists, strict=True):
                if picked:
                    index = torch.tensor(picked, device=input_ids.device)
                    self.plan.setdefault(item.layer, []).append((item, index))

    def edit_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output):
            items = self.plan.get(layer)
            if not items:
                return None
            hidden, residual = output
            for item, index in items:
                x = hidden[index] + residual[index]  # the residual stream at the chosen rows
                delta = torch.zeros_like(x)
                if (
                    item.add_vector is not None
                ):  # first, as in `CompiledIntervention.apply`: latent edits read it
                    delta += item.add_vector.to(x.device, x.dtype)
                    x = x + delta
                if item.latent is not None:
                    delta += item.latent.delta(x, x.dtype)
                residual = residual.index_add(0, index, delta)
            return hidden, residual

        return hook

    def pop_counts(self, rows: list[str]) -> dict[str, int]:
        for r in rows:
            self.counted_to.pop(r, None)
        return {r: self.counts.pop(r, 0) for r in rows}

    # -- helpers -------------------------------------------------------------------------------
    def _compile(self, payload: str) -> list[CompiledIntervention]:
        """The compiled specs of a payload (JSON list of {"spec", "token_ids"}), kept by its text."""
        if payload in self.compiled:
            self.compiled.move_to_end(payload)
            return self.compiled[payload]
        out = []
        for entry in json.loads(payload):
            sae = self.saes[entry["spec"]["sae"]]
            spec = Intervention.from_dict(entry["spec"], sae=sae)
            out.append(CompiledIntervention.build(spec, sae, tuple(entry["token_ids"]), self.dtype))
        self.compiled[payload] = out
        if len(self.compiled) > COMPILED_KEPT:
            self.compiled.popitem(last=False)
        return out

    def _count(self, row: str, request_id: str, state, items, positions: list[int], ids: list[int]) -> None:
        """Add to `row`'s count the positions up to this step's last that its specs select and that are not
        counted yet: those fed now, and before them those a prefix-cache hit held (read from the history)."""
        start = self.counted_to.get(row, 0)
        if not positions or positions[-1] < start:
            return
        fed = dict(zip(positions, ids, strict=True))
        span = list(range(start, positions[-1] + 1))
        tokens = [fed[p] if p in fed else state.get_token_id(p) for p in span]
        special = None
        if any(item.positions == "special" for item in items):
            special = self._marks(request_id, state, span, tokens)
        n_prompt = state.num_prompt_tokens
        self.counts[row] = self.counts.get(row, 0) + sum(
            selects(item.positions, p, t, n_prompt, special, k)
            for item in items
            for k, (p, t) in enumerate(zip(span, tokens, strict=True))
        )
        self.counted_to[row] = span[-1] + 1

    def _marks(self, request_id: str, state, positions: list[int], ids: list[int]) -> list[bool]:
        if self.special is None:
            raise RuntimeError("positions='special' needs the chat template's special tokens")
        sequence = self.marks.setdefault(request_id, MarkedSequence(self.special))
        return sequence.marks(positions, ids, state.get_token_id)

    def _forget(self, live: dict) -> None:
        """Drop the marks of requests the runner no longer holds (their counts wait to be read)."""
        for request_id in [r for r in self.marks if r not in live]:
            del self.marks[request_id]


def selects(positions, position: int, token: int, n_prompt: int, special: list[bool] | None, k: int) -> bool:
    """Whether a spec's `positions` select a row at absolute `position` holding `token` (k: its index in the
    request's rows of this step, for the `special` marks)."""
    if positions == "all":
        return True
    if positions == "prompt":
        return position < n_prompt
    if positions == "generated":
        return position >= n_prompt
    if positions == "special":
        return special[k]
    return token in positions

"""The lm-eval model `fast-steer`: lm-eval's HFLM with fast-steer interventions active.

`--model fast-steer --model_args pretrained=REF,sae=DIR,spec=FILE`: REF is resolved with
`hub.load_model` (so `pretrained=default` works offline), `spec` is an intervention JSON/YAML
file (`steer.Intervention`, one or several), `sae` (optional, with `sae_id` for a sub-folder or
Hub repo path) replaces the SAE reference written in the spec.
Without `spec` the adapter is the plain model. The spec is active during every model forward
lm-eval makes (loglikelihood, rolling loglikelihood) and during generation. `use_cache=False` generates
without the KV cache (HFLM always turns it on); prompt / generated positions are placed alike either way.

Each task's requests run in their own `steer()` block, whose count of edited positions is printed per task
(`steered_positions`). A spec that edited no position in a whole task stops the run (`UnsteeredError`, which
says why: `special` positions need the chat template, `--apply_chat_template`) unless `allow_unsteered=true`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from steer.chat_template import template_messages
from steer.errors import ConfigError, FastSteerError

if TYPE_CHECKING:
    from hub import DeviceMap

log = logging.getLogger(__name__)

MODEL_NAME = "fast-steer"


class UnsteeredError(FastSteerError):
    """A spec edited no position in a whole task: its scores would be the plain model's."""


@register_model(MODEL_NAME)
class FastSteerLM(HFLM):
    """An `HFLM` over a fast-steer `SteeredModel`; the spec (if any) wraps every forward and generate."""

    def __init__(
        self,
        pretrained: Any = "default",
        sae: Any = None,
        sae_id: str | None = None,
        spec: Any = None,
        tokenizer: Any = None,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        use_cache: bool | str = True,
        allow_unsteered: bool | str = False,
        device_map: str | None = None,
        max_memory: dict[str, str] | str | None = None,
        offload_folder: str | None = None,
        **kwargs: Any,
    ) -> None:
        """`pretrained`: a model reference for `hub.load_model` or a loaded model (then pass `tokenizer`).

        `spec`: an intervention file (one or several interventions), an `Intervention`, or a list of
        them; `sae` (+ `sae_id` for a sub-folder): an SAE folder, Hub repo or loaded SAE that replaces
        the SAE of every spec. `dtype`: as `hub.load_model` takes it (`auto`: `hub.fast_dtype(device)`).
        `allow_unsteered`: go on (with a warning) when a spec edits no position in a whole task.
        `device_map` (+ `max_memory`, `{"0": "20GiB"}` or `0=20GiB;cpu=60GiB`, and `offload_folder`): spread
        the model over devices with accelerate (`hub.DeviceMap`); each SAE runs on its layer's device.
        """
        from steer import SteeredModel

        device = _pick_device(device)
        if isinstance(pretrained, str | Path):
            from hub import load_model

            if tokenizer is not None:
                raise ConfigError("pass `tokenizer` only with a loaded model as `pretrained`")
            placement = _device_map(device_map, max_memory, offload_folder)
            model, tok = load_model(str(pretrained), dtype=dtype, device=device, device_map=placement)
        else:
            if tokenizer is None:
                raise ConfigError("a loaded model as `pretrained` needs its `tokenizer` too")
            model, tok = pretrained, tokenizer
        kwargs.pop("backend", None)
        super().__init__(pretrained=model, tokenizer=tok, backend="causal", **kwargs)
        self.steered = SteeredModel(model, tok)
        self.use_cache = _flag(use_cache, "use_cache")
        self.allow_unsteered = _flag(allow_unsteered, "allow_unsteered")
        self.steered_positions: dict[str, list[int]] = {}  # per task: the positions each spec edited
        self._steering_enabled = True
        self.use_specs(spec, sae, sae_id)

    def use_specs(self, spec: Any, sae: Any = None, sae_id: str | None = None) -> None:
        """Replace the active spec(s) (arguments as in `load_specs`); SAEs are loaded and checked now."""
        self.specs = load_specs(spec, sae, sae_id)
        self.compiled = [self.steered.compile(item) for item in self.specs]

    @property
    def steering_active(self) -> bool:
        """Whether requests run with the spec(s) applied now."""
        return bool(self.specs) and self._steering_enabled

    @contextmanager
    def steering_disabled(self) -> Iterator[None]:
        """Run the plain model inside the block (used by `--compare` for the base run)."""
        previous, self._steering_enabled = self._steering_enabled, False
        try:
            yield
        finally:
            self._steering_enabled = previous

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """HFLM's rendering, with the turns as `steer.chat_template.template_messages` gives them: a system message
        is folded into the first user turn where the template has no system role (HFLM would drop it)."""
        return super().apply_chat_template(
            template_messages(self.tokenizer, chat_history), add_generation_prompt
        )

    # Every model call lm-eval makes happens inside one of these three request methods.
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._per_task(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._per_task(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._per_task(super().generate_until, requests, disable_tqdm)

    def _per_task(self, run: Callable[..., list], requests: list, disable_tqdm: bool) -> list:
        """`run(requests)`; with a spec active, one task at a time, each in its own `steer()` block, whose
        count is printed and checked once every task of the call has run (a task's requests are all of
        one type, so they all come in one call)."""
        if not self.steering_active:
            return run(requests, disable_tqdm=disable_tqdm)
        by_task: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_task.setdefault(getattr(request, "task_name", None) or "?", []).append(i)
        results: list = [None] * len(requests)
        for task, indices in by_task.items():
            with self.steered.steer(self.compiled) as report:
                out = run([requests[i] for i in indices], disable_tqdm=disable_tqdm)
            for i, result in zip(indices, out, strict=True):
                results[i] = result
            self.steered_positions[task] = report.per_spec
            print(f"fast-steer: {task}: steered {_counted(report.per_spec)} ({len(indices)} requests)")
        for task, indices in by_task.items():
            self._check_steered(task, len(indices))
        return results

    def _check_steered(self, task: str, n_requests: int) -> None:
        """`UnsteeredError` (or, with `allow_unsteered`, a warning) when a spec edited nothing in `task`."""
        for i, (spec, count) in enumerate(zip(self.specs, self.steered_positions[task], strict=True)):
            if count:
                continue
            message = (
                f"spec {i + 1} (layer {spec.layer}, positions {_positions(spec.positions)}) edited no position "
                f"in task {task} ({n_requests} requests), so its scores would be the plain model's: "
                f"{_why_unsteered(spec.positions)}"
            )
            if not self.allow_unsteered:
                raise UnsteeredError(
                    f"{message}. To run anyway, pass --allow-unsteered (model_args allow_unsteered=true)."
                )
            print(f"fast-steer: warning: {message}; going on (allow_unsteered)")

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """HFLM's generation, with the KV cache as `use_cache` says."""
        if self.use_cache:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        model, self._model = self._model, _WithoutCache(self._model)
        try:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        finally:
            self._model = model


class _WithoutCache:
    """The model as HFLM sees it, whose `generate` runs without the KV cache whatever it is asked."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._wrapped = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._wrapped.generate(*args, **{**kwargs, "use_cache": False})


def _counted(per_spec: list[int]) -> str:
    """`12 positions`, or with several specs `15 positions (spec 1: 12, spec 2: 3)`."""
    text = f"{sum(per_spec)} positions"
    if len(per_spec) > 1:
        text += " (" + ", ".join(f"spec {i + 1}: {n}" for i, n in enumerate(per_spec)) + ")"
    return text


def _positions(positions: str | list) -> str:
    return repr(positions) if isinstance(positions, str) else str(list(positions))


def _why_unsteered(positions: str | list) -> str:
    """Why a spec's positions can match nothing in a task, and what to do."""
    if positions == "special":
        return (
            "`special` positions are the chat template's special tokens (and the role names after them), and "
            "these prompts have none: pass --apply_chat_template so lm-eval renders them with the chat template"
        )
    if positions == "generated":
        return "`generated` positions exist only in generation tasks; this task only scores given text"
    if isinstance(positions, str):
        return f"no position of these requests is a {positions!r} position"
    return "none of its tokens occur in this task's prompts"


def _flag(value: bool | str, name: str) -> bool:
    """A boolean model argument (lm-eval passes `key=value` strings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"model_args {name}={value!r} must be true or false")


def load_specs(spec: Any, sae: Any = None, sae_id: str | None = None) -> list:
    """`spec` (None, a spec file, an `Intervention` or a list of them) as a list of Interventions.

    With `sae` (a folder, a Hub repo with optional `sae_id`, or a loaded SAE), every spec uses that SAE.
    """
    from steer import Intervention, load_interventions
    from steer.spec import parse_sae_ref

    if spec in (None, ""):
        if sae not in (None, ""):
            raise ConfigError("model_args has sae=... but no spec=FILE: the spec says which features to edit")
        return []
    items = list(spec) if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]
    specs: list = []
    for item in items:
        if isinstance(item, Intervention):
            specs.append(item)
        else:
            specs.extend(load_interventions(Path(str(item)).expanduser()))
    if sae not in (None, ""):
        ref = parse_sae_ref(sae, sae_id) if isinstance(sae, str | Path) else sae
        specs = [s.with_sae(ref) for s in specs]
    return specs


def _device_map(
    strategy: str | None, max_memory: dict[str, str] | str | None, offload_folder: str | None
) -> DeviceMap | None:
    """The `hub.DeviceMap` of the model arguments (None without `device_map`); lm-eval hands `key=value`
    strings, so `max_memory` may be `0=20GiB;cpu=60GiB`."""
    from hub import DeviceMap

    if strategy is None:
        if max_memory or offload_folder:
            raise ConfigError(
                "model_args max_memory and offload_folder apply only with device_map (e.g. auto)"
            )
        return None
    if isinstance(max_memory, str):
        return DeviceMap.parse(strategy, max_memory.split(";"), offload_folder)
    return DeviceMap(strategy, max_memory or None, offload_folder)


def _pick_device(device: str | None) -> str:
    """The requested device, or CPU when CUDA is asked for (lm-eval's default) but absent."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.info("device %s requested but CUDA is not available; using cpu", device)
        return "cpu"
    return str(device)

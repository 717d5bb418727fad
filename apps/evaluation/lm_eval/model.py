"""The lm-eval model `fast-steer`: lm-eval's HFLM with fast-steer interventions active.

`--model fast-steer --model_args pretrained=REF,sae=DIR,spec=FILE`: REF is resolved with
`hub.load_model` (so `pretrained=default` works offline), `spec` is an intervention JSON/YAML
file (`steer.Intervention`, one or several), `sae` (optional, with `sae_id` for a sub-folder or
Hub repo path) replaces the SAE reference written in the spec.
Without `spec` the adapter is the plain model. The spec is active during every model forward
lm-eval makes (loglikelihood, rolling loglikelihood) and during generation. `use_cache=False` generates
without the KV cache (HFLM always turns it on); prompt / generated positions are placed alike either way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from steer.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_NAME = "fast-steer"


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
        **kwargs: Any,
    ) -> None:
        """`pretrained`: a model reference for `hub.load_model` or a loaded model (then pass `tokenizer`).

        `spec`: an intervention file (one or several interventions), an `Intervention`, or a list of
        them; `sae` (+ `sae_id` for a sub-folder): an SAE folder, Hub repo or loaded SAE that replaces
        the SAE of every spec. `dtype`: as `hub.load_model` takes it (`auto`: `hub.fast_dtype(device)`).
        """
        from steer import SteeredModel

        device = _pick_device(device)
        if isinstance(pretrained, str | Path):
            from hub import load_model

            if tokenizer is not None:
                raise ConfigError("pass `tokenizer` only with a loaded model as `pretrained`")
            model, tok = load_model(str(pretrained), dtype=dtype, device=device)
        else:
            if tokenizer is None:
                raise ConfigError("a loaded model as `pretrained` needs its `tokenizer` too")
            model, tok = pretrained, tokenizer
        kwargs.pop("backend", None)
        super().__init__(pretrained=model, tokenizer=tok, backend="causal", **kwargs)
        self.steered = SteeredModel(model, tok)
        self.use_cache = _flag(use_cache, "use_cache")
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

    @contextmanager
    def _steering(self) -> Iterator[None]:
        if not self.steering_active:
            yield
            return
        with self.steered.steer(self.compiled):
            yield

    # Every model call lm-eval makes happens inside one of these three request methods.
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        with self._steering():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        with self._steering():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        with self._steering():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

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


def _pick_device(device: str | None) -> str:
    """The requested device, or CPU when CUDA is asked for (lm-eval's default) but absent."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.info("device %s requested but CUDA is not available; using cpu", device)
        return "cpu"
    return str(device)

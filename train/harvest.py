"""Residual-stream harvesting after decoder layer L, with a forward that stops after layer L.

Public API:
    decoder_layers(model) -> nn.ModuleList        (re-exported from steer.hooks)
    hook_name(layer) -> "blocks.{L}.hook_resid_post"
    Harvester(model, layer, *, exclude_first_token=False, max_norm_multiple=None, compile=False)
        .residuals(batch) -> Tensor [B, T, d] in the model's dtype
        .per_sequence(batch) -> list of float32 [len_i, d] (all real tokens, no exclusions)
        .__call__(batch) -> float32 [n_kept, d] (real tokens only, exclusions applied); .last_stats
    harvest_throughput(model, batches, layer, repeats=3, on_tokens=None, compile=False) -> dict (bare vs harvest)
    bare_forward_rate(model, batches, layer, repeats=3, autocast=False, compile=False) -> real tokens/s
    compile_seconds(model, batch, layer) -> the one-off cost of compiling the layers again in this process

Layer L is the output of decoder block L (0-indexed), i.e. ``hidden_states[L + 1]`` in transformers.
A forward hook on block L raises a private exception carrying the block's output, so neither the later
blocks, the final norm nor the LM head run. The model's own dtype is the harvesting dtype (load it with
``load_model(dtype="bfloat16")`` for fast CPU harvesting); the residuals handed out are float32.
Batches are right-padded (see ``train.sequences``) and run without an attention mask: in a causal model a
real token never attends to padding on its right, so its residual equals the unpadded forward's, and the
mask-free call keeps SDPA on its fast causal path. Padding positions are dropped before anything leaves.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from steer.errors import ConfigError
from steer.hooks import decoder_layers, input_device
from steer.positions import without_sink
from train.compiled import compile_forwards, swapped_forwards
from train.sequences import Batch

__all__ = [
    "Harvester",
    "bare_forward_rate",
    "compile_seconds",
    "decoder_layers",
    "drop_norm_outliers",
    "harvest_throughput",
    "hook_name",
]


class _StopForward(Exception):
    """Raised by the hook on layer L to end the forward; carries that layer's output."""

    def __init__(self, output: torch.Tensor):
        super().__init__("forward stopped after the harvested layer")
        self.output = output


def hook_name(layer: int) -> str:
    """SAELens hook name of the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def _check_layer(model: PreTrainedModel, layer: int) -> nn.ModuleList:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ConfigError(
            f"layer {layer} out of range: {type(model).__name__} has layers 0..{len(layers) - 1}"
        )
    return layers


class Harvester:
    """Residuals after decoder block `layer` for the real tokens of a Batch."""

    def __init__(
        self,
        model: PreTrainedModel,
        layer: int,
        *,
        exclude_first_token: bool = False,
        max_norm_multiple: float | None = None,
        compile: bool = False,
    ):
        self.layers = _check_layer(model, layer)
        if max_norm_multiple is not None and max_norm_multiple <= 0:
            raise ConfigError(f"max_norm_multiple must be positive or None, got {max_norm_multiple}")
        self.model = model
        self.layer = layer
        self.exclude_first_token = exclude_first_token
        self.max_norm_multiple = max_norm_multiple
        self.last_stats: dict[str, int] = {}
        # `compile`: layers 0..layer run `torch.compile`d forwards in this harvester's calls (train.compiled)
        self.compiled = compile_forwards(self.layers[: layer + 1], self.device) if compile else None

    @property
    def d_in(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the input ids go (the token embeddings' device; with a device map, layers may be elsewhere)."""
        return input_device(self.model)

    def residuals(self, batch: Batch) -> torch.Tensor:
        """[B, T, d] residual stream after block `layer`, in the model's dtype (padding rows included)."""

        def stop(_module, _args, output):
            raise _StopForward(output[0] if isinstance(output, tuple) else output)

        handle = self.layers[self.layer].register_forward_hook(stop)
        try:
            with torch.inference_mode(), swapped_forwards(self.layers[: self.layer + 1], self.compiled):
                self.model.base_model(input_ids=batch.input_ids.to(self.device), use_cache=False)
        except _StopForward as stopped:
            return stopped.output
        finally:
            handle.remove()
        raise RuntimeError(
            f"layer {self.layer} of {type(self.model).__name__} was not called during the forward"
        )

    def per_sequence(self, batch: Batch) -> list[torch.Tensor]:
        """float32 residuals of each sequence's real tokens, [len_i, d] each (no exclusions)."""
        h = self.residuals(batch)
        return [h[row, :n].float() for row, n in enumerate(batch.lengths)]

    def __call__(self, batch: Batch) -> torch.Tensor:
        """float32 [n_kept, d]: real tokens only, minus the configured exclusions."""
        h = self.residuals(batch)
        keep = batch.attention_mask.to(h.device, dtype=torch.bool, copy=True)
        n_real = int(keep.sum())
        if self.exclude_first_token:
            keep = without_sink(keep)
        x, n_norm = drop_norm_outliers(h[keep].float(), self.max_norm_multiple)
        self.last_stats = {
            "real": n_real,
            "padded": batch.n_padded,
            "excluded_first": n_real - int(keep.sum()),
            "excluded_norm": n_norm,
            "kept": len(x),
        }
        return x


def drop_norm_outliers(x: torch.Tensor, max_norm_multiple: float | None) -> tuple[torch.Tensor, int]:
    """The rows of `x [n, d]` whose norm is at most `max_norm_multiple` x their median norm (all rows for
    None), and how many were dropped."""
    if max_norm_multiple is None or not len(x):
        return x, 0
    norms = x.norm(dim=-1)
    ok = norms <= max_norm_multiple * norms.median()
    return x[ok], int((~ok).sum())


def _bare_forward(
    model: PreTrainedModel,
    layer: int,
    batches: list[Batch],
    autocast: bool = False,
    forwards: list[Callable] | None = None,
) -> None:
    """Layers 0..layer only (a truncated stack, plus the final norm), outputs discarded: the reference cost.
    `autocast`: under bfloat16 autocast (float32 weights, as SAELens runs its model with `autocast_lm`);
    `forwards`: the layers' compiled forwards (`Harvester.compiled`) in place of their own."""
    base = model.base_model
    name = "layers" if isinstance(getattr(base, "layers", None), nn.ModuleList) else "h"
    full = getattr(base, name)
    device = next(model.parameters()).device
    setattr(base, name, full[: layer + 1])
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, torch.bfloat16, enabled=autocast),
            swapped_forwards(full[: layer + 1], forwards),
        ):
            for batch in batches:
                base(input_ids=batch.input_ids.to(device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the kernels have run, not just been queued
    finally:
        setattr(base, name, full)


def bare_forward_rate(
    model: PreTrainedModel,
    batches: list[Batch],
    layer: int,
    repeats: int = 3,
    autocast: bool = False,
    compile: bool = False,
) -> float:
    """Real tokens/s of the bare forward to `layer` over `batches` (median of `repeats` passes; with
    `compile`, after a first pass that compiles the layers)."""
    layers = _check_layer(model, layer)
    forwards = compile_forwards(layers[: layer + 1], input_device(model)) if compile else None
    if forwards:
        _bare_forward(model, layer, batches, autocast, forwards)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _bare_forward(model, layer, batches, autocast, forwards)
        seconds.append(time.perf_counter() - t0)
    return sum(b.n_tokens for b in batches) / statistics.median(seconds)


def compile_seconds(model: PreTrainedModel, batch: Batch, layer: int) -> float:
    """Seconds a run in this process loses to compiling layers 0..`layer` (`compile=True`): Dynamo's state is
    reset, then a first, compiling pass over `batch` is timed against a second. Inductor's disk cache stays, as
    a run after a machine's first finds it; a new process also pays Inductor's first-use set-up once."""
    layers = _check_layer(model, layer)
    torch.compiler.reset()
    t0 = time.perf_counter()
    forwards = compile_forwards(layers[: layer + 1], input_device(model))
    _bare_forward(model, layer, [batch], forwards=forwards)
    t1 = time.perf_counter()
    _bare_forward(model, layer, [batch], forwards=forwards)
    return max(0.0, (t1 - t0) - (time.perf_counter() - t1))


def harvest_throughput(
    model: PreTrainedModel,
    batches: list[Batch],
    layer: int,
    repeats: int = 3,
    on_tokens: Callable[[int], None] | None = None,
    compile: bool = False,
) -> dict:
    """Tokens/s of a bare forward to `layer` vs. harvesting (real tokens out, float32) on the same batches,
    both with compiled layers where `compile` (then after a first, compiling pass of each).

    Repeats are interleaved (bare, harvest, bare, harvest, ...) and the medians compared. Rates count
    real tokens; `padding_share` is the share of computed positions that were padding. `on_tokens(n)` is
    called after each pass over the batches with its real tokens (for a progress bar).
    """
    _check_layer(model, layer)
    if not batches or repeats < 1:
        raise ValueError("harvest_throughput needs at least one batch and one repeat")
    harvester = Harvester(model, layer, compile=compile)
    if compile:
        _bare_forward(model, layer, batches, forwards=harvester.compiled)
        for batch in batches:
            harvester(batch)
    real = sum(b.n_tokens for b in batches)
    padded = sum(b.n_padded for b in batches)
    bare_s, harvest_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _bare_forward(model, layer, batches, forwards=harvester.compiled)
        t1 = time.perf_counter()
        for batch in batches:
            harvester(batch)
        t2 = time.perf_counter()
        bare_s.append(t1 - t0)
        harvest_s.append(t2 - t1)
        if on_tokens is not None:
            on_tokens(2 * real)
    bare, harvest = statistics.median(bare_s), statistics.median(harvest_s)
    return {
        "layer": layer,
        "dtype": str(harvester.dtype).removeprefix("torch."),
        "batches": len(batches),
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": 1.0 - real / padded,
        "repeats": repeats,
        "bare_seconds": bare,
        "harvest_seconds": harvest,
        "bare_tokens_per_s": real / bare,
        "harvest_tokens_per_s": real / harvest,
        "ratio": bare / harvest,
    }

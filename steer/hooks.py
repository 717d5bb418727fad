"""The steering hooks: apply compiled interventions to decoder-layer outputs, at placed positions.

Hooks are installed once per model (while any `steer()` block on it is open) and hold no edits
themselves: the active edits belong to a context (`activate`, a context variable), so two threads,
each inside its own `steer()` on one shared model, never see each other's edits, and a thread with no
open block runs the plain model. A forward pre-hook on the base module places every call for each
active context (`steer.placement`); forward hooks on the decoder layers then edit the residual at
exactly the positions each spec targets. Both run before any other hook on their module
(`prepend=True`), so transformers' hidden-state recording and user hooks see the edited residual.

The edits:

- `add`: `x + sum_k strength_k * W_dec[k] / ||W_dec[k]||` (no encoder);
- `scale/set/ablate`: `x + decode(f') - decode(f)`, i.e. `x + sum_k (f'_k - f_k) W_dec[k]` (the SAE's
  error term is kept). For ReLU / JumpReLU SAEs `f_k` needs only encoder column k; TopK (and any
  architecture whose activation couples features) runs the full encoder.

Only targeted positions are gathered and sent through the SAE; other positions are left bit-identical.

Every block counts what it edited (`SteeringReport`), so a spec that matched no position is seen, never
silently unsteered.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from steer.errors import ConfigError
from steer.placement import ForwardCall, Placement, SequenceTracker
from steer.positions import SpecialTokens
from steer.sae import SAE
from steer.spec import LATENT_OPS, Intervention, SpecError

Positions = str | tuple[int, ...]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama/Qwen2/Mistral `model.layers`, GPT-2 `transformer.h`, ...)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks", "decoder.layers"):
        module = base
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}; expected e.g. model.layers")


# -- compiled edits ------------------------------------------------------------------------------
class LatentEdit:
    """`scale/set/ablate` edits of a few features as `delta(x) = sum_k (f'_k - f_k) W_dec[k]`.

    `f' = f * mul + val`: scale (mul=s, val=0), set (0, s), ablate (0, 0). `f_k` comes from the
    architecture's `feature_encoder`: ReLU / JumpReLU need only the edited encoder columns, TopK all
    pre-activations (for the k-th largest) but no dense latent tensor.
    """

    def __init__(self, sae: SAE, features: list[int], mul: list[float], val: list[float]) -> None:
        self.sae = sae
        self.activations = torch.no_grad()(sae.feature_encoder(features))
        mul_minus_one = torch.tensor(mul, dtype=sae.dtype, device=sae.device) - 1
        val = torch.tensor(val, dtype=sae.dtype, device=sae.device)
        with torch.no_grad():
            W_dec = sae.W_dec[torch.tensor(features, device=sae.device)].detach()
            # (f * (mul - 1) + val) @ W_dec as one addmm: f @ W_delta + offset
            self.W_delta = (mul_minus_one[:, None] * W_dec).contiguous()
            self.offset = val @ W_dec

    @torch.no_grad()
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """`decode(f') - decode(f)` at residuals `x [N, d_in]`, in `x`'s dtype."""
        f = self.activations(x)
        diff = torch.addmm(self.offset, f, self.W_delta)
        if self.sae.cfg.normalize_activations != "none":
            diff = self.sae.normalize_out(diff) - self.sae.normalize_out(torch.zeros_like(diff))
        return diff.to(x.dtype)


@dataclass
class CompiledIntervention:
    """An intervention ready to run on one model: its layer, positions and precomputed tensors."""

    layer: int
    positions: Positions
    add_vector: torch.Tensor | None
    latent: LatentEdit | None

    @classmethod
    def build(
        cls, spec: Intervention, sae: SAE, token_ids: tuple[int, ...], dtype: torch.dtype
    ) -> CompiledIntervention:
        adds = [e for e in spec.edits if e.op == "add"]
        add_vector = None
        if adds:
            with torch.no_grad():
                rows = sae.W_dec[[e.feature for e in adds]].detach().float()
                rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                strengths = torch.tensor([e.strength for e in adds], device=rows.device)
                add_vector = (strengths @ rows).to(dtype)
        latent_edits = [e for e in spec.edits if e.op in LATENT_OPS]
        latent = None
        if latent_edits:
            mul = [e.strength if e.op == "scale" else 0.0 for e in latent_edits]
            val = [e.strength if e.op == "set" else 0.0 for e in latent_edits]
            latent = LatentEdit(sae, [e.feature for e in latent_edits], mul, val)
        positions: Positions = spec.positions if isinstance(spec.positions, str) else token_ids
        return cls(layer=spec.layer, positions=positions, add_vector=add_vector, latent=latent)

    def apply(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The edited residual `[B, T, d]`; `mask [B, T]` selects positions (None: all)."""
        if self.add_vector is not None:
            vec = self.add_vector.to(hidden.device)
            hidden = hidden + vec if mask is None else torch.where(mask.unsqueeze(-1), hidden + vec, hidden)
        if self.latent is None:
            return hidden
        if mask is None:
            return hidden + self.latent.delta(hidden.reshape(-1, hidden.shape[-1])).view_as(hidden)
        selected = hidden[mask]
        edited = selected + self.latent.delta(selected)
        return hidden.masked_scatter(mask.unsqueeze(-1), edited)


# -- per-call positions -----------------------------------------------------------------------------
@dataclass
class CallPositions:
    """Which positions of one placed forward call each kind of `positions` selects (lazy, cached).

    `rows` (batch indices) limits every selection to those rows; None means every row.
    """

    placement: Placement
    rows: tuple[int, ...] | None = None
    _masks: dict = field(default_factory=dict)
    _counts: dict = field(default_factory=dict)

    @cached_property
    def real(self) -> torch.Tensor | None:
        """Bool `[B, T]` of real (non-padding) positions; None when every position is real."""
        if self.placement.real is None:
            return None
        return self.placement.call.call_mask().to(self.placement.call.device).bool()

    def selects_nothing(self, positions: Positions) -> bool:
        """Whether `positions` selects no position of this call (the hook then has nothing to do)."""
        placed = self.placement
        if self.rows is not None and not self.rows:
            return True
        if positions == "special":
            rows = placed.special if self.rows is None else [placed.special[r] for r in self.rows]
            return not any(map(any, rows))
        if self.rows is not None and positions not in ("prompt", "generated"):
            return not bool(self.mask(positions).any())
        if positions == "generated":
            return not any(placed.generated)
        if positions == "prompt":
            return all(placed.generated)
        mask = self.mask(positions)
        return mask is not None and not bool(mask.any())

    def mask(self, positions: Positions) -> torch.Tensor | None:
        """Bool mask `[B, T]`, or None meaning "every position"."""
        if positions not in self._masks:
            self._masks[positions] = self._restrict(self._compute(positions))
        return self._masks[positions]

    def count(self, positions: Positions) -> torch.Tensor | int:
        """How many positions `mask(positions)` selects: a total, or per row up to the last of `rows` (`[R]`),
        left on the device (no host sync); cached like the masks."""
        if positions not in self._counts:
            mask, call = self.mask(positions), self.placement.call
            if mask is None:
                self._counts[positions] = call.batch * call.length
            elif self.rows is None:
                self._counts[positions] = mask.sum()
            else:
                self._counts[positions] = mask[: self.rows[-1] + 1].sum(dim=1)
        return self._counts[positions]

    def _restrict(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        if self.rows is None:
            return mask
        call = self.placement.call
        rows = torch.zeros(call.batch, 1, dtype=torch.bool, device=call.device)
        rows[list(self.rows)] = True
        return rows.expand(call.batch, call.length) if mask is None else mask & rows

    def _compute(self, positions: Positions) -> torch.Tensor | None:
        call = self.placement.call
        if positions == "all":
            return self.real
        if positions in ("prompt", "generated"):
            generated = torch.tensor(self.placement.generated, dtype=torch.bool, device=call.device)
            inside = ~generated if positions == "prompt" else generated
            out = inside.unsqueeze(0).expand(call.batch, -1)
            return out if self.real is None else out & self.real
        if positions == "special":
            return torch.tensor(self.placement.special, dtype=torch.bool, device=call.device)
        if call.input_ids is None:
            raise SpecError(
                f"positions={list(positions)} needs input_ids, but the model was called with inputs_embeds"
            )
        out = torch.isin(call.input_ids, torch.tensor(positions, device=call.input_ids.device))
        return out if self.real is None else out & self.real


# -- what a block edited ---------------------------------------------------------------------------
class SteeringReport:
    """The positions each spec of one `steer()` block edited, per spec and (with `rows=`) per batch row.

    A position counts once per spec each time the spec's layer runs on it and the spec's positions select
    it: a prompt in one forward (or prefill) counts each selected prompt position once, and a KV-cached
    `generate` counts each new token once (without the cache every step recomputes, and recounts, the whole
    sequence). Padding is never counted. Counts accumulate on the device while the block runs (no host
    sync per step); reading them syncs once.
    """

    def __init__(self, n_specs: int, rows: tuple[int, ...] | None = None) -> None:
        self.rows = rows
        self._counts: list[torch.Tensor | int] = [0] * n_specs

    def add(self, spec: int, count: torch.Tensor | int) -> None:
        """Add `CallPositions.count` of one layer application of spec number `spec`."""
        self._counts[spec] = self._counts[spec] + count

    @property
    def per_spec(self) -> list[int]:
        """Positions each spec edited, in the order the block was given them."""
        return [int(c.sum()) if isinstance(c, torch.Tensor) else int(c) for c in self._counts]

    @property
    def positions(self) -> int:
        """Positions edited by every spec of the block together (a position two specs edit counts twice)."""
        return sum(self.per_spec)

    def row(self, index: int) -> int:
        """Positions edited in batch row `index` by every spec of the block (a `steer(rows=...)` block)."""
        if self.rows is None:
            raise ValueError(
                "per-row counts need a steer(rows=...) block; use .positions for the whole batch"
            )
        if index not in self.rows:
            return 0
        return int(sum(c[index] for c in self._counts if isinstance(c, torch.Tensor)))


# -- contexts and the shared hooks ------------------------------------------------------------------
class SteeringContext:
    """One open `steer()` block: its compiled edits by layer (with each one's index in the block), the batch
    rows they apply to (None: all), the sequence its calls have followed and what it has edited."""

    def __init__(
        self,
        base: nn.Module,
        compiled: list[CompiledIntervention],
        special_tokens: SpecialTokens | None,
        rows: tuple[int, ...] | None = None,
    ) -> None:
        if rows is not None and any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in rows):
            raise SpecError(f"rows must be batch indices (ints >= 0), got {list(rows)}")
        self.base = base
        self.rows = None if rows is None else tuple(sorted(set(rows)))
        self.by_layer: dict[int, list[tuple[int, CompiledIntervention]]] = {}
        for index, item in enumerate(compiled):
            self.by_layer.setdefault(item.layer, []).append((index, item))
        self.report = SteeringReport(len(compiled), self.rows)
        needs_special = any(item.positions == "special" for item in compiled)
        if needs_special and special_tokens is None:
            raise SpecError("positions='special' needs the tokenizer's special tokens (a chat template)")
        self.tracker = SequenceTracker(special_tokens if needs_special else None)
        self.current: CallPositions | None = None


_ACTIVE: ContextVar[tuple[SteeringContext, ...]] = ContextVar("fast_steer_active", default=())


def base_module(model: nn.Module) -> nn.Module:
    """The module whose forward takes the token ids and the cache (`model.model`, GPT-2 `transformer`)."""
    return getattr(model, "base_model", model)


class ModelHooks:
    """The steering hooks of one model: installed while any context needs them, counted per layer.

    Held weakly both ways: the registry is keyed weakly by the base module and the hooks keep only a weak
    reference to it (the decoder layers are its children and never point back), so dropping the model frees it.
    """

    _lock = threading.Lock()
    _by_model: weakref.WeakKeyDictionary[nn.Module, ModelHooks] = weakref.WeakKeyDictionary()

    def __init__(self, model: nn.Module) -> None:
        self._base = weakref.ref(base_module(model))
        self.layers = decoder_layers(model)
        self._pre_handle: torch.utils.hooks.RemovableHandle | None = None
        self._layer_handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._users: Counter[int] = Counter()
        self._contexts = 0

    @property
    def base(self) -> nn.Module | None:
        """The base module, or None once it has been freed."""
        return self._base()

    @classmethod
    def of(cls, model: nn.Module) -> ModelHooks:
        """The hooks of `model` (one set per base module, however many wrappers share it)."""
        base = base_module(model)
        with cls._lock:
            if base not in cls._by_model:
                cls._by_model[base] = cls(model)
            return cls._by_model[base]

    def acquire(self, layers: list[int]) -> None:
        with self._lock:
            if self._contexts == 0:
                self._pre_handle = self.base.register_forward_pre_hook(
                    self._place, with_kwargs=True, prepend=True
                )
            self._contexts += 1
            for layer in layers:
                if self._users[layer] == 0:
                    self._layer_handles[layer] = self.layers[layer].register_forward_hook(
                        self._layer_hook(layer), prepend=True
                    )
                self._users[layer] += 1

    def release(self, layers: list[int]) -> None:
        with self._lock:
            for layer in layers:
                self._users[layer] -= 1
                if self._users[layer] == 0:
                    self._layer_handles.pop(layer).remove()
                    del self._users[layer]
            self._contexts -= 1
            if self._contexts == 0 and self._pre_handle is not None:
                self._pre_handle.remove()
                self._pre_handle = None

    def _place(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        contexts = [ctx for ctx in _ACTIVE.get() if ctx.base is module]
        if not contexts:
            return
        call = ForwardCall.read(module, args, kwargs)
        for ctx in contexts:
            if ctx.rows and ctx.rows[-1] >= call.batch:
                raise SpecError(
                    f"steer(rows={list(ctx.rows)}) names row {ctx.rows[-1]}, but the forward call has a batch "
                    f"of {call.batch}; rows are indices into the batch the model is called with"
                )
            ctx.current = CallPositions(ctx.tracker.place(call), ctx.rows)

    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output):
            hidden = None
            for ctx in _ACTIVE.get():
                items = ctx.by_layer.get(layer) if ctx.base is self.base else None
                if not items:
                    continue
                if ctx.current is None:
                    raise SpecError(f"steered layer {layer} ran outside a forward of the steered model")
                for index, item in items:
                    if ctx.current.selects_nothing(item.positions):
                        continue
                    if hidden is None:
                        hidden = output[0] if isinstance(output, tuple) else output
                    hidden = item.apply(hidden, ctx.current.mask(item.positions))
                    ctx.report.add(index, ctx.current.count(item.positions))
            if hidden is None:
                return output
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook


def is_steering(model: nn.Module) -> bool:
    """Whether the current context (thread, task) has a `steer()` block open on `model`."""
    base = base_module(model)
    return any(ctx.base is base for ctx in _ACTIVE.get())


@contextmanager
def activate(
    model: nn.Module,
    compiled: list[CompiledIntervention],
    special_tokens: SpecialTokens | None,
    rows: tuple[int, ...] | None = None,
) -> Iterator[SteeringContext]:
    """Apply `compiled` to every forward of `model` run in the current context (thread, task) inside,
    on batch `rows` only (None: every row)."""
    ctx = SteeringContext(base_module(model), compiled, special_tokens, rows)
    hooks = ModelHooks.of(model)
    layers = sorted(ctx.by_layer)
    hooks.acquire(layers)
    token = _ACTIVE.set((*_ACTIVE.get(), ctx))
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)
        hooks.release(layers)

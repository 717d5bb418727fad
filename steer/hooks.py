"""The steering hooks: apply compiled interventions at their sites in the decoder layers, at placed positions.

Hooks are installed once per model (while any `steer()` block on it is open) and hold no edits
themselves: the active edits belong to a context (`activate`, a context variable), so two threads,
each inside its own `steer()` on one shared model, never see each other's edits, and a thread with no
open block runs the plain model. A forward pre-hook on the base module places every call for each
active context (`steer.placement`); hooks on each site's hook points (`steer.sites`: a decoder block's
output, the input of `o_proj`, the MLP's input or output) then edit exactly the positions each spec
targets. All run before any other hook on their module (`prepend=True`), so transformers' hidden-state
recording and user hooks see the edited activations.

The edits:

- `add`: `x + sum_k strength_k * W_dec[k] / ||W_dec[k]||` (no encoder);
- `scale/set/ablate`: `x + decode(f') - decode(f)`, i.e. `x + sum_k (f'_k - f_k) W_dec[k]` (the SAE's
  error term is kept). For ReLU / JumpReLU SAEs `f_k` needs only encoder column k; TopK (and any
  architecture whose activation couples features) runs the full encoder.

A transcoder reads one point and writes another: its `f` is encoded from the MLP's input (captured by a pre-hook
on the MLP, for the current call only) and `(f' - f) @ W_dec` is added to the MLP's output, so its error term
is kept like an SAE's (`b_dec` and the skip connection cancel in the difference).

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
from steer.sites import HookPoint, Site, point_module
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


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the execution device accelerate recorded when the model was dispatched with a
    device map (also for a module whose weights wait offloaded on `meta`), else its parameters' device."""
    hook = getattr(module, "_hf_hook", None)
    for item in (hook, *getattr(hook, "hooks", ())):  # one hook, or a SequentialHook of several
        device = getattr(item, "execution_device", None)
        if device is not None:
            return torch.device(device)  # accelerate records a GPU as its index
    param = next(module.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def layer_device(model: nn.Module, layer: int) -> torch.device:
    """Where decoder block `layer` computes, and so where an SAE that reads it and its edits belong."""
    return module_device(decoder_layers(model)[layer])


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids belong: the device its token embeddings compute on."""
    return module_device(model.get_input_embeddings())


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
    def delta(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`decode(f') - decode(f)` `[N, d_out]` at inputs `x [N, d_in]`, in `dtype` (default: `x`'s)."""
        f = self.activations(x)
        diff = torch.addmm(self.offset, f, self.W_delta)
        if self.sae.cfg.normalize_activations != "none":
            diff = self.sae.normalize_out(diff) - self.sae.normalize_out(torch.zeros_like(diff))
        return diff.to(dtype or x.dtype)


@dataclass
class CompiledIntervention:
    """An intervention ready to run on one model: its site, positions and precomputed tensors."""

    site: Site
    positions: Positions
    add_vector: torch.Tensor | None
    latent: LatentEdit | None

    @property
    def layer(self) -> int:
        return self.site.layer

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
        return cls(site=spec.site(sae), positions=positions, add_vector=add_vector, latent=latent)

    def apply(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The edited activations `hidden [B, T, d_out]` at the write point; `mask [B, T]` selects positions
        (None: all). The latent edit encodes `source [B, T, d_in]` (a transcoder's MLP input; None: `hidden`)."""
        if mask is not None:
            mask = mask.to(hidden.device)  # placed where the inputs are; a device map runs layers elsewhere
        if self.add_vector is not None:
            vec = self.add_vector.to(hidden.device)
            hidden = hidden + vec if mask is None else torch.where(mask.unsqueeze(-1), hidden + vec, hidden)
        if self.latent is None:
            return hidden
        read = hidden if source is None else source
        if mask is None:
            delta = self.latent.delta(read.reshape(-1, read.shape[-1]), hidden.dtype)
            return hidden + delta.view_as(hidden)
        edited = hidden[mask] + self.latent.delta(read[mask], hidden.dtype)
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
    """One open `steer()` block: its compiled edits by the hook point they write (with each one's index in the
    block), the points transcoders read apart from that, the batch rows they apply to (None: all), the
    sequence its calls have followed and what it has edited."""

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
        self.by_point: dict[HookPoint, list[tuple[int, CompiledIntervention]]] = {}
        for index, item in enumerate(compiled):
            self.by_point.setdefault(item.site.write_point, []).append((index, item))
        self.reads = {
            item.site.read_point for item in compiled if item.site.read_point != item.site.write_point
        }
        self.captured: dict[HookPoint, torch.Tensor] = {}  # inputs read at `reads` in the current call
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
        self._point_handles: dict[HookPoint, torch.utils.hooks.RemovableHandle] = {}
        self._users: Counter[HookPoint] = Counter()
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

    def acquire(self, points: list[HookPoint]) -> None:
        with self._lock:
            modules = [
                point_module(self.layers[layer], name) for layer, name in points
            ]  # all found, or raise
            if self._contexts == 0:
                self._pre_handle = self.base.register_forward_pre_hook(
                    self._place, with_kwargs=True, prepend=True
                )
            self._contexts += 1
            for point, (module, side) in zip(points, modules, strict=True):
                if self._users[point] == 0:
                    edit = self._point_edit(point)
                    self._point_handles[point] = (
                        module.register_forward_hook(_output_hook(edit), prepend=True)
                        if side == "output"
                        else module.register_forward_pre_hook(_input_hook(edit, point), prepend=True)
                    )
                self._users[point] += 1

    def release(self, points: list[HookPoint]) -> None:
        with self._lock:
            for point in points:
                self._users[point] -= 1
                if self._users[point] == 0:
                    self._point_handles.pop(point).remove()
                    del self._users[point]
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
            ctx.captured.clear()

    def _point_edit(self, point: HookPoint):
        """The edit at hook point `point`: `hidden` -> the edited tensor, or None when nothing applies. It also
        keeps `hidden` for the transcoders that read it, until the point they write has run."""
        layer = point[0]

        def edit(hidden: torch.Tensor) -> torch.Tensor | None:
            edited = None
            for ctx in _ACTIVE.get():
                if ctx.base is not self.base:
                    continue
                if point in ctx.reads:
                    ctx.captured[point] = hidden
                items = ctx.by_point.get(point)
                if not items:
                    continue
                if ctx.current is None:
                    raise SpecError(f"steered layer {layer} ran outside a forward of the steered model")
                for index, item in items:
                    if ctx.current.selects_nothing(item.positions):
                        continue
                    source = None
                    if item.site.read_point != point:
                        source = ctx.captured.get(item.site.read_point)
                        if source is None:
                            raise SpecError(
                                f"the transcoder of layer {layer} found no MLP input: the layer's MLP output ran "
                                "without its input having been seen in this forward call"
                            )
                    current = hidden if edited is None else edited
                    edited = item.apply(current, ctx.current.mask(item.positions), source)
                    ctx.report.add(index, ctx.current.count(item.positions))
                for _, item in items:
                    ctx.captured.pop(item.site.read_point, None)  # used: free it before the next layer
            return edited

        return edit


def _output_hook(edit):
    """A forward hook applying `edit` to a module's output (the first element of a tuple output)."""

    def hook(module: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        edited = edit(hidden)
        if edited is None:
            return output
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    return hook


def _input_hook(edit, point: HookPoint):
    """A forward pre-hook applying `edit` to a module's first positional input."""

    def hook(module: nn.Module, args: tuple):
        if not args:
            raise SpecError(
                f"cannot place the {point[1]} hook of layer {point[0]}: {type(module).__name__} was called "
                "without a positional input"
            )
        edited = edit(args[0])
        return None if edited is None else (edited, *args[1:])

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
    points = sorted(set(ctx.by_point) | ctx.reads)
    hooks.acquire(points)
    token = _ACTIVE.set((*_ACTIVE.get(), ctx))
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)
        hooks.release(points)

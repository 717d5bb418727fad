"""The hook manager: apply compiled interventions to decoder-layer outputs, at tracked positions.

A forward pre-hook on the model's base module reads each call's `input_ids`, attention mask and
cache length, and works out which positions every spec targets (special tokens via a streaming
automaton whose state carries across KV-cache steps). Forward hooks on the decoder layers then
edit the residual at exactly those positions:

- `add`: `x + sum_k strength_k * W_dec[k] / ||W_dec[k]||` (no encoder);
- `scale/set/ablate`: `x + decode(f') - decode(f)`, i.e. `x + sum_k (f'_k - f_k) W_dec[k]` (the SAE's
  error term is kept). For ReLU / JumpReLU SAEs `f_k` needs only encoder column k; TopK (and any
  architecture whose activation couples features) runs the full encoder.

Only targeted positions are gathered and sent through the SAE; other positions are left bit-identical.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from steer.positions import SpecialTokens, SpecialTokenStream
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
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; expected e.g. model.layers")


# -- compiled edits ------------------------------------------------------------------------------
class LatentEdit:
    """`scale/set/ablate` edits of a few features as `delta(x) = sum_k (f'_k - f_k) W_dec[k]`.

    `f' = f * mul + val`: scale (mul=s, val=0), set (0, s), ablate (0, 0). How `f_k` is computed
    (`mode`): "columns" (ReLU/JumpReLU: only the edited encoder columns), "topk" (all pre-activations,
    then the k-th largest as threshold; no dense latent tensor), "full" (`sae.encode`, other architectures).
    """

    def __init__(self, sae: SAE, features: list[int], mul: list[float], val: list[float]) -> None:
        self.sae = sae
        idx = torch.tensor(features, device=sae.device)
        self.features = idx
        self.mul_minus_one = torch.tensor(mul, dtype=sae.dtype, device=sae.device) - 1
        self.val = torch.tensor(val, dtype=sae.dtype, device=sae.device)
        self.mode = {"standard": "columns", "jumprelu": "columns", "topk": "topk"}.get(
            sae.architecture, "full"
        )
        with torch.no_grad():
            self.W_dec = sae.W_dec[idx].detach().contiguous()
            if self.mode == "columns":
                self.W_enc = sae.W_enc[:, idx].detach().contiguous()
                self.b_enc = sae.b_enc[idx].detach()
                threshold = getattr(sae, "threshold", None)
                self.threshold = None if threshold is None else threshold[idx].detach()

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sae.normalize_in(x.to(self.sae.dtype))
        return h - self.sae.b_dec if self.sae.cfg.apply_b_dec_to_input else h

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The edited features' activations `[N, k]` at residuals `x [N, d_in]`."""
        if self.mode == "full":
            return self.sae.encode(x)[:, self.features]
        if self.mode == "topk":
            h = self._encoder_input(x) @ self.sae.W_enc + self.sae.b_enc
            kth = h.topk(self.sae.cfg.k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
            h = h[:, self.features]
            return torch.relu(h) * (h >= kth)
        h = self._encoder_input(x) @ self.W_enc + self.b_enc
        acts = torch.relu(h)
        return acts if self.threshold is None else acts * (h > self.threshold)

    @torch.no_grad()
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """`decode(f') - decode(f)` at residuals `x [N, d_in]`, in `x`'s dtype."""
        f = self.activations(x)
        diff = (f * self.mul_minus_one + self.val) @ self.W_dec
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


# -- per-call position bookkeeping -----------------------------------------------------------------
@dataclass
class CallPositions:
    """Which positions of the current forward call each kind of `positions` selects (lazy, cached)."""

    input_ids: torch.Tensor | None
    shape: tuple[int, int]  # (B, T) of this call
    device: torch.device
    attention_mask: torch.Tensor | None  # [B, T] of this call's positions, 0 = padding
    start: int  # absolute column of the first position (the cache length)
    prompt_len: int
    special_marks: list[list[bool]] | None  # from the special-token stream, None if not tracked
    _masks: dict = field(default_factory=dict)
    _empty: dict = field(default_factory=dict)

    @cached_property
    def real(self) -> torch.Tensor | None:
        """Bool `[B, T]` of real (non-padding) positions; None when every position is real."""
        if self.attention_mask is None:
            return None
        real = self.attention_mask.to(self.device).bool()
        return None if bool(real.all()) else real

    def mask(self, positions: Positions) -> torch.Tensor | None:
        """Bool mask `[B, T]`, or None meaning "every position"."""
        if positions not in self._masks:
            self._masks[positions] = self._compute(positions)
        return self._masks[positions]

    def selects_nothing(self, positions: Positions) -> bool:
        """Whether `positions` selects no position of this call (the hook then has nothing to do)."""
        if positions not in self._empty:
            if positions == "special" and self.special_marks is not None:  # no tensor needed to tell
                self._empty[positions] = not any(map(any, self.special_marks))
            else:
                mask = self.mask(positions)
                self._empty[positions] = mask is not None and not bool(mask.any())
        return self._empty[positions]

    def _compute(self, positions: Positions) -> torch.Tensor | None:
        if positions == "all":
            return self.real
        if positions in ("prompt", "generated"):
            batch, length = self.shape
            cols = torch.arange(self.start, self.start + length, device=self.device)
            inside = cols < self.prompt_len if positions == "prompt" else cols >= self.prompt_len
            out = inside.unsqueeze(0).expand(batch, -1)
            return out if self.real is None else out & self.real
        if self.input_ids is None:
            raise SpecError(
                f"positions={positions!r} needs input_ids, but the model was called with inputs_embeds"
            )
        if positions == "special":
            return torch.tensor(self.special_marks, dtype=torch.bool, device=self.device)
        out = torch.isin(self.input_ids, torch.tensor(positions, device=self.input_ids.device))
        return out if self.real is None else out & self.real


class HookManager:
    """Installs the position pre-hook and one layer hook per intervention; removes them all on `remove`."""

    def __init__(
        self,
        model: nn.Module,
        compiled: list[CompiledIntervention],
        special_tokens: SpecialTokens | None,
    ) -> None:
        self.model = model
        self.compiled = compiled
        self.special_tokens = special_tokens
        self.needs_special = any(c.positions == "special" for c in compiled)
        if self.needs_special and special_tokens is None:
            raise SpecError("positions='special' needs the tokenizer's special tokens (a chat template)")
        self.declared_prompt_len: int | None = None
        self._stream: SpecialTokenStream | None = None
        self._prompt_len = 0
        self._current: CallPositions | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def attach(self) -> HookManager:
        layers = decoder_layers(self.model)
        base = getattr(self.model, "base_model", self.model)
        try:
            self._handles.append(base.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            for item in self.compiled:
                self._handles.append(layers[item.layer].register_forward_hook(self._layer_hook(item)))
        except Exception:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None
        self._stream = None

    # -- hooks ---------------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(args) > 1:
            kwargs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}
            args = ()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape_source = input_ids if input_ids is not None else embeds
        if shape_source is None:
            raise SpecError("a steered forward needs input_ids or inputs_embeds")
        batch, length = shape_source.shape[:2]
        start = _cache_length(kwargs.get("past_key_values"))
        attention_mask = kwargs.get("attention_mask")
        call_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
            call_mask = attention_mask[:, -length:]
        if start == 0:
            self._prompt_len = self.declared_prompt_len or length
            if self.needs_special:
                if input_ids is None:
                    raise SpecError(
                        "positions='special' needs input_ids, but the model was called with inputs_embeds"
                    )
                self._stream = self.special_tokens.stream(batch, input_ids.device)
        elif self.needs_special and (self._stream is None or self._stream.batch_size != batch):
            raise SpecError(
                "a cached forward step does not continue the previous call (batch size changed or no prompt "
                "was seen); special positions are tracked per row, so beam search and cache reordering are "
                "not supported"
            )
        special_marks = self._stream.advance(input_ids, call_mask) if self.needs_special else None
        self._current = CallPositions(
            input_ids,
            (batch, length),
            shape_source.device,
            call_mask,
            start,
            self._prompt_len,
            special_marks,
        )

    def _layer_hook(self, item: CompiledIntervention):
        def hook(module: nn.Module, args: tuple, output):
            if self._current is None:
                raise SpecError(f"steered layer {item.layer} ran outside a forward of the steered model")
            if self._current.selects_nothing(item.positions):
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            edited = item.apply(hidden, self._current.mask(item.positions))
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook


def _cache_length(past_key_values) -> int:
    """Tokens already in the KV cache (0 without a cache or at the first step)."""
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2]) if len(past_key_values) else 0

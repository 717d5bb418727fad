"""Where a forward call sits in its sequence, placed from what the runtime itself has seen.

A steering context follows every forward of the base model it steers. `ForwardCall.read` takes what a
call carries without relying on argument names for the cache: a cache is found by its type, under any
name. `SequenceTracker.place` then derives the call's first column from the columns the context has
consumed since the prefill, cross-checked against every signal the call carries (the cache length,
`cache_position`, the attention-mask width, `position_ids`), and classifies each column:

- a call that starts at column 0 begins a new sequence, unless it carries no cache and re-reads the
  sequence seen so far plus one token per row (generation with `use_cache=False`); rows may come back
  reordered or repeated (beam search), each is matched to the row it extends;
- a call that starts where the context stopped continues it (KV-cache decoding, a prompt in chunks);
- a call that starts inside what was seen follows a cache that was cropped (assisted decoding);
- anything else cannot be placed and raises `SpecError`, naming what was seen.

A column is *generated* when it was fed in a one-token continuation step (the model's own token fed
back); every other column is *prompt*. Beam search reorders the cache between steps: the tracker follows
the cache object's `reorder_cache`, so per-row state (the special-token automaton) moves with its beam.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from functools import cache

import torch
from transformers.cache_utils import Cache

from steer.positions import OUTSIDE, SpecialTokens, marked
from steer.spec import SpecError


@cache
def _class_signature(cls: type) -> inspect.Signature:
    """The signature of `cls.forward` without `self`: cached per class, so no model is kept alive by it."""
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return inspect.Signature(params)


def _signature(module: torch.nn.Module) -> inspect.Signature:
    """The signature `module` is called with (an instance-level `forward`, e.g. a wrapper, is read uncached)."""
    if "forward" in vars(module):
        return inspect.signature(module.forward)
    return _class_signature(type(module))


def _legacy_cache_length(value) -> int | None:
    """Length of a legacy `((key, value), ...)` cache, or None when `value` is not one."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and value[0]:
        key = value[0][0]
        if isinstance(key, torch.Tensor) and key.ndim == 4:
            return int(key.shape[-2])
    return None


def _describe(signals: dict[str, int]) -> str:
    return ", ".join(f"{name} = {value}" for name, value in signals.items()) or "no cache, mask or positions"


@dataclass
class ForwardCall:
    """What one forward call of a base model carries that tells where it sits."""

    input_ids: torch.Tensor | None
    batch: int
    length: int
    device: torch.device
    attention_mask: torch.Tensor | None  # 2-D [B, cached + new] or None
    cache: Cache | None
    has_cache: bool  # a cache object of any kind (a `Cache` or a legacy tuple) came with the call
    signals: dict[str, int]  # name -> the first column that signal implies

    @classmethod
    def read(cls, module: torch.nn.Module, args: tuple, kwargs: dict) -> ForwardCall:
        bound = dict(kwargs)
        if args:  # positional arguments (GPT-2 takes the cache second): bind them to their names
            signature = _signature(module)
            bound = dict(signature.bind_partial(*args, **kwargs).arguments)
            for param in signature.parameters.values():
                if param.kind is param.VAR_KEYWORD:
                    bound |= bound.pop(param.name, {})
        input_ids = bound.get("input_ids")
        embeds = bound.get("inputs_embeds")
        source = input_ids if isinstance(input_ids, torch.Tensor) else embeds
        if not isinstance(source, torch.Tensor) or source.ndim < 2:
            raise SpecError(
                f"a steered forward of {type(module).__name__} needs input_ids [B, T] or inputs_embeds "
                f"[B, T, d]; got arguments {sorted(k for k, v in bound.items() if v is not None)}"
            )
        batch, length = int(source.shape[0]), int(source.shape[1])
        signals: dict[str, int] = {}
        found_cache, has_cache = None, False
        for name, value in bound.items():
            if isinstance(value, Cache):
                found_cache, has_cache = value, True
                signals[f"cache '{name}' length"] = int(value.get_seq_length())
            elif (legacy := _legacy_cache_length(value)) is not None:
                has_cache = True
                signals[f"legacy cache '{name}' length"] = legacy
        mask = bound.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        if mask is not None:
            if mask.shape[0] != batch or mask.shape[1] < length:
                raise SpecError(
                    f"the attention mask has shape {tuple(mask.shape)} for {batch} rows of {length} new "
                    "tokens; expected [B, cached + new]"
                )
            signals["attention mask width - new tokens"] = int(mask.shape[1]) - length
        cache_position = bound.get("cache_position")
        if isinstance(cache_position, torch.Tensor) and cache_position.numel():
            signals["cache_position[0]"] = int(cache_position.reshape(-1)[0])
        position_ids = bound.get("position_ids")
        if mask is None and isinstance(position_ids, torch.Tensor) and position_ids.numel():
            first = position_ids.reshape(-1, position_ids.shape[-1])[:, 0]
            if bool((first == first[0]).all()):  # without padding, positions are columns
                signals["position_ids[..., 0]"] = int(first[0])
        return cls(
            input_ids=input_ids if isinstance(input_ids, torch.Tensor) else None,
            batch=batch,
            length=length,
            device=source.device,
            attention_mask=mask,
            cache=found_cache,
            has_cache=has_cache,
            signals=signals,
        )

    def start(self) -> int:
        """The absolute column of the call's first token; 0 when the call carries no such signal."""
        values = set(self.signals.values())
        if len(values) > 1:
            raise SpecError(
                f"cannot place a forward call of {self.length} new tokens: its signals disagree on where "
                f"it starts ({_describe(self.signals)})"
            )
        return values.pop() if values else 0

    def call_mask(self) -> torch.Tensor | None:
        """The attention mask of this call's own columns `[B, T]`, or None."""
        return None if self.attention_mask is None else self.attention_mask[:, -self.length :]


@dataclass
class Placement:
    """The outcome of placing one call: which of its positions are real, generated and special."""

    call: ForwardCall
    real: list[list[bool]] | None  # [B][T], None when every position is real
    generated: list[bool]  # [T]: fed in a one-token continuation step
    special: list[list[bool]] | None  # [B][T] special-token marks, None when not tracked


class SequenceTracker:
    """The columns one steering context has consumed since the prefill, per row, and their marks."""

    def __init__(self, special_tokens: SpecialTokens | None) -> None:
        self.special_tokens = special_tokens
        self.ids: list[list[int]] = []  # per row, every column seen (-1 where unknown: inputs_embeds)
        self.real: list[list[bool]] = []
        self.states: list[list[int]] = []  # automaton state after each column
        self.generated: list[bool] = []  # per column
        self._followed: weakref.ref | None = None

    @property
    def length(self) -> int:
        return len(self.generated)

    # -- placing a call ------------------------------------------------------------------------
    def place(self, call: ForwardCall) -> Placement:
        start = call.start()
        ids = call.input_ids.tolist() if call.input_ids is not None else None
        mask = call.call_mask()
        real = None if mask is None or bool(mask.all()) else mask.bool().tolist()
        seen = self.length
        if start == 0:
            rows = None if call.has_cache else self._extended_rows(ids, real, call)
            if rows is None:
                self._reset(call.batch)
                new_from, one_token_step = 0, False
            else:
                self._take_rows(rows)
                new_from, one_token_step = seen, True
        elif start > seen or call.batch != len(self.ids):
            raise SpecError(
                f"cannot place a forward call of {call.batch} rows x {call.length} tokens starting at column "
                f"{start} ({_describe(call.signals)}): this steering context has seen {len(self.ids)} rows x "
                f"{seen} columns; enter steer() before the prompt is fed, so that every position it edits "
                "has been seen"
            )
        else:
            if start < seen:
                self._crop(start)
            new_from, one_token_step = 0, call.length == 1
        self._follow(call.cache)
        self._append(ids, real, call, new_from, one_token_step)
        begin = self.length - call.length
        return Placement(
            call=call,
            real=real,
            generated=self.generated[begin:],
            special=self._marks(begin) if self.special_tokens is not None else None,
        )

    def _extended_rows(self, ids, real, call: ForwardCall) -> list[int] | None:
        """Without a cache: which seen row each row re-reads (plus one new token), or None if any does not."""
        seen = self.length
        if ids is None or seen == 0 or call.length != seen + 1:
            return None
        index = {(tuple(r), tuple(m)): i for i, (r, m) in enumerate(zip(self.ids, self.real, strict=True))}
        rows = []
        for row in range(call.batch):
            key = (tuple(ids[row][:seen]), tuple(real[row][:seen]) if real else (True,) * seen)
            if key not in index:
                return None
            rows.append(index[key])
        return rows

    def _append(self, ids, real, call: ForwardCall, new_from: int, one_token_step: bool) -> None:
        for row in range(call.batch):
            row_ids = ids[row][new_from:] if ids is not None else [-1] * (call.length - new_from)
            row_real = real[row][new_from:] if real is not None else [True] * len(row_ids)
            states = self.states[row]
            if self.special_tokens is None:
                states.extend([OUTSIDE] * len(row_ids))
            elif ids is None:
                raise SpecError(
                    "positions='special' needs input_ids, but the model was called with inputs_embeds"
                )
            else:
                states.extend(
                    self.special_tokens.advance(states[-1] if states else OUTSIDE, row_ids, row_real)
                )
            self.ids[row].extend(row_ids)
            self.real[row].extend(row_real)
        self.generated.extend([one_token_step] * (call.length - new_from))

    def _marks(self, begin: int) -> list[list[bool]]:
        return [marked(s[begin:], r[begin:]) for s, r in zip(self.states, self.real, strict=True)]

    # -- sequence bookkeeping --------------------------------------------------------------------
    def _reset(self, batch: int) -> None:
        self.ids = [[] for _ in range(batch)]
        self.real = [[] for _ in range(batch)]
        self.states = [[] for _ in range(batch)]
        self.generated = []

    def _crop(self, length: int) -> None:
        for rows in (self.ids, self.real, self.states):
            for row in rows:
                del row[length:]
        del self.generated[length:]

    def _take_rows(self, rows: list[int]) -> None:
        self.ids = [list(self.ids[r]) for r in rows]
        self.real = [list(self.real[r]) for r in rows]
        self.states = [list(self.states[r]) for r in rows]

    def _follow(self, cache_object: Cache | None) -> None:
        """Reorder per-row state whenever `cache_object` is reordered (beam search)."""
        if cache_object is None or (self._followed is not None and self._followed() is cache_object):
            return
        reorder = getattr(cache_object, "reorder_cache", None)
        if reorder is None:
            return
        tracker = weakref.ref(self)

        def reorder_with_rows(beam_idx: torch.Tensor, *args, **kwargs):
            owner = tracker()
            if owner is not None:
                owner._take_rows([int(i) for i in beam_idx.tolist()])
            return reorder(beam_idx, *args, **kwargs)

        cache_object.reorder_cache = reorder_with_rows
        self._followed = weakref.ref(cache_object)

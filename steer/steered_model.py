"""`SteeredModel`: a Hugging Face causal LM plus its tokenizer, steerable by intervention specs."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.chat_template import template_messages
from steer.hooks import (
    CompiledIntervention,
    SteeringReport,
    activate,
    decoder_layers,
    input_device,
    is_steering,
    layer_device,
)
from steer.positions import SpecialTokens, pad_token_id, resolve_special_tokens, token_ids
from steer.sae import SAE
from steer.sites import UnplaceableHook, site_widths
from steer.spec import Intervention, SpecError

Spec = Intervention | CompiledIntervention
Specs = Spec | Sequence[Spec] | None


class SteeredModel:
    """Wraps `model` and `tokenizer`; `with sm.steer(spec): ...` edits SAE features in anything run inside.

    Without an active spec, `generate` and `__call__` are exactly the model's own. Inside `steer`,
    every forward of the model run in the same thread (or task) is placed from what the runtime has
    seen since the prompt: prompt, generated and special positions hold with left or right padding,
    with or without the KV cache, under plain `model.generate` (lm-eval calls it directly), beam search
    and `num_return_sequences`. Other threads are not affected by the block.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        special_tokens: SpecialTokens | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._special_tokens = special_tokens
        self._saes: dict[str, SAE] = {}

    # -- model facts ---------------------------------------------------------------------------
    @property
    def special_tokens(self) -> SpecialTokens:
        """The chat template's special tokens, resolved from the tokenizer on first use."""
        if self._special_tokens is None:
            self._special_tokens = resolve_special_tokens(self.tokenizer)
        return self._special_tokens

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embeddings' device (with a device map, layers may compute elsewhere)."""
        return input_device(self.model)

    def layer_device(self, layer: int) -> torch.device:
        """Where decoder block `layer` computes (an offloaded block: where accelerate runs it)."""
        return layer_device(self.model, layer)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def active(self) -> bool:
        """Whether this thread (or task) has a `steer` block open on the model."""
        return is_steering(self.model)

    # -- running ---------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """The model's forward (steered inside a `steer` block)."""
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """HF `generate`, arguments passed through (steered inside a `steer` block)."""
        return self.model.generate(*args, **kwargs)

    @contextmanager
    def steer(self, *specs: Specs, rows: Sequence[int] | None = None) -> Iterator[SteeringReport]:
        """Apply interventions (one, several, or lists of them) to everything this thread runs inside.

        `rows` limits the edits to those batch indices (None: every row). Nested blocks with different
        `rows` give each row of one batched forward its own edits (mixed-spec batching); rows that no
        block names run the plain model bit for bit.

        Specs may be `Intervention`s (compiled here: SAE references are loaded once, then cached, and
        every spec is checked against its SAE and the model before any hook is installed; a bad spec
        raises `SpecError` and installs nothing) or the `CompiledIntervention`s that `compile` returned
        (reused as they are). Blocks nest; all their edits compose (applied in order at each layer).
        The edits are removed on exit, also when the block raises.

        Yields a `SteeringReport` of what the block edited (`with sm.steer(spec) as report: ...`, then
        `report.positions`, `report.per_spec`, and `report.row(i)` with `rows`): a spec whose positions
        matched nothing (say `special` positions in a prompt without the chat template) shows 0.
        """
        compiled = [
            item if isinstance(item, CompiledIntervention) else self.compile(item) for item in _flatten(specs)
        ]
        if not compiled:
            yield SteeringReport(0, None if rows is None else tuple(rows))
            return
        needs_special = any(c.positions == "special" for c in compiled)
        special = self.special_tokens if needs_special else None
        with activate(self.model, compiled, special, None if rows is None else tuple(rows)) as ctx:
            yield ctx.report

    def chat(
        self,
        messages: str | Sequence[dict[str, str]],
        spec: Specs = None,
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        seed: int = 0,
        **gen_kwargs,
    ) -> str:
        """The assistant's reply (text, special tokens dropped) to `messages` (a string = one user turn; a system
        message is folded into the first user turn where the template has no system role, as in Gemma 2)."""
        conversation = (
            [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        )
        encoded = self.tokenizer.apply_chat_template(
            template_messages(self.tokenizer, conversation),
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        encoded = {k: v.to(self.device) for k, v in encoded.items()}
        gen_kwargs.setdefault("pad_token_id", pad_token_id(self.tokenizer))
        if do_sample:
            torch.manual_seed(seed)
        with self.steer(spec), torch.no_grad():
            out = self.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=do_sample, **gen_kwargs)
        return self.tokenizer.decode(
            out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()

    # -- specs -----------------------------------------------------------------------------------
    def load_sae(self, spec: Intervention) -> SAE:
        """The spec's SAE on the device of the layer it reads, where its edits run (references loaded once
        per SteeredModel)."""
        spec.check_layer(self.n_layers)
        device = self.layer_device(spec.layer)
        if isinstance(spec.sae, SAE):
            sae = spec.sae
        else:
            key = json.dumps(spec.sae, sort_keys=True)
            if key not in self._saes:
                self._saes[key] = spec.load_sae(device=device)
            sae = self._saes[key]
        if sae.device != device:
            sae = sae.to(device)
        return sae

    def compile(self, spec: Intervention) -> CompiledIntervention:
        """Check `spec` against this model and its SAE and precompute what its hooks need (reusable)."""
        if not isinstance(spec, Intervention):
            raise SpecError(f"steer() takes Intervention objects, got {type(spec).__name__}")
        sae = self.load_sae(spec)
        site = spec.site(sae)
        try:
            widths = site_widths(decoder_layers(self.model)[spec.layer], site, self.d_model)
        except UnplaceableHook as exc:
            raise SpecError(f"{site.describe()}: {exc}") from None
        spec.check_model(self.n_layers, self.d_model, sae, widths)
        tokens: tuple[int, ...] = ()
        if not isinstance(spec.positions, str):
            try:
                tokens = tuple(token_ids(self.tokenizer, spec.positions))
            except ValueError as exc:
                raise SpecError(f"positions: {exc}") from exc
        return CompiledIntervention.build(spec, sae, tokens, self.dtype)


def _flatten(specs: tuple) -> list[Spec]:
    out: list[Spec] = []
    for item in specs:
        if item is None:
            continue
        if isinstance(item, Intervention | CompiledIntervention):
            out.append(item)
        elif isinstance(item, Sequence) and not isinstance(item, str):
            out.extend(_flatten(tuple(item)))
        else:
            raise SpecError(
                f"steer() takes Intervention (or compiled) objects or lists of them, got {type(item).__name__}"
            )
    return out

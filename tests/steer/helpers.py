"""Shared helpers for steering tests: random SAEs, chat prompts, hook counting, residual capture."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from steer.hooks import decoder_layers
from steer.sae import SAE, SAEConfig, build_sae


def random_sae(d_in: int, d_sae: int = 96, architecture: str = "standard", seed: int = 0, **cfg) -> SAE:
    """A random SAE whose features fire on about half the positions (standard/jumprelu) or k of them (topk)."""
    torch.manual_seed(seed)
    if architecture == "topk":
        cfg.setdefault("k", 8)
    sae = build_sae(SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, **cfg))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        if architecture == "jumprelu":
            sae.threshold.fill_(0.05)
    return sae


def chat_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of one-turn chats with the generation prompt."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for t in texts
    ]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq)
        mask[row, cols] = 1
    return ids, mask


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextmanager
def capture_layer(model: torch.nn.Module, layer: int):
    """Record the (final, post-edit) outputs of decoder layer `layer` in a list."""
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def greedy(generate, ids: torch.Tensor, mask: torch.Tensor, n: int, pad_id: int, **kw) -> torch.Tensor:
    """The new tokens of greedy generation (fixed length)."""
    out = generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=pad_id,
        **kw,
    )
    return out[:, ids.shape[1] :]


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """`cache` under the keyword this transformers version's forward takes (`cache` from 5.24 on)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@contextmanager
def capture_edits(model: torch.nn.Module, layer: int):
    """Inside a `steer()` block: per forward call, the edit the steering hooks made at `layer` `[B, T, d]`.

    One hook runs before the steering hook (registered with `prepend=True` after it), one after.
    """
    before: list[torch.Tensor] = []
    deltas: list[torch.Tensor] = []

    def first(module, args, output):
        before.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    def last(module, args, output):
        deltas.append((output[0] if isinstance(output, tuple) else output).detach() - before[-1])

    block = decoder_layers(model)[layer]
    handles = [block.register_forward_hook(first, prepend=True), block.register_forward_hook(last)]
    try:
        yield deltas
    finally:
        for handle in handles:
            handle.remove()

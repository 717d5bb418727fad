"""A steered model is freed once the caller drops it: hooks and placement hold models weakly."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from steer import Edit, Intervention, SteeredModel
from tests.conftest import build_tiny_model
from tests.steer.helpers import chat_ids, pad_batch, random_sae


def _steer_once(arch: str, tok) -> tuple[weakref.ref, weakref.ref]:
    """Build a tiny model, steer one forward and one generate; weak references to it and its base model."""
    model = build_tiny_model(arch, len(tok), n_layers=2)
    sm = SteeredModel(model, tok)
    spec = Intervention(layer=1, sae=random_sae(model.config.hidden_size), edits=[Edit(0, "add", 5.0)])
    ids, mask = pad_batch(chat_ids(tok, ["Say hi"]), tok.pad_token_id)
    with torch.no_grad(), sm.steer(spec):
        model(ids, attention_mask=mask)  # positional input_ids: the placement binds the signature
        sm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    return weakref.ref(model), weakref.ref(model.base_model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_dropped_steered_model_is_freed(chatml_tokenizer, arch):
    model, base = _steer_once(arch, chatml_tokenizer)
    gc.collect()
    assert model() is None and base() is None, f"the {arch} model (or its base model, its weights) is alive"


def test_load_steer_unload_cycles_leave_no_model_alive(chatml_tokenizer):
    refs = [_steer_once("llama" if i % 2 else "gpt2", chatml_tokenizer) for i in range(20)]
    gc.collect()
    assert sum(ref() is not None for pair in refs for ref in pair) == 0

"""Hook maths: the few-feature error-term edit equals the full-SAE edit; add directions; layers; tuples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steer import Edit, Intervention
from steer.hooks import CompiledIntervention, LatentEdit, activate, decoder_layers
from tests.conftest import TINY_ARCHS, build_tiny_model
from tests.steer.helpers import random_sae


def _full_edit(sae, x, features, mul, val):
    """Reference: encode everything, edit the latents, x + decode(f') - decode(f)."""
    f = sae.encode(x)
    f_new = f.clone()
    for k, m, v in zip(features, mul, val, strict=True):
        f_new[:, k] = f[:, k] * m + v
    recon = sae.decode(f)
    return x + sae.decode(f_new) - recon


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"apply_b_dec_to_input": True},
        {"normalize_activations": "constant_norm_rescale"},
        {"normalize_activations": "layer_norm"},
        {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 0.3},
    ],
)
def test_latent_edit_matches_full_sae(architecture, cfg):
    sae = random_sae(32, 64, architecture, **cfg).double()
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(10, 32, dtype=torch.float64) * 3
    features, mul, val = [1, 5, 9], [2.5, 0.0, 0.0], [0.0, 4.0, 0.0]  # scale, set, ablate
    edit = LatentEdit(sae, features, mul, val)
    got = x + edit.delta(x)
    torch.testing.assert_close(got, _full_edit(sae, x, features, mul, val), rtol=1e-9, atol=1e-9)
    f_before = sae.encode(x)[:, features]
    assert (f_before[:, 0] > 0).any() or architecture == "topk", "the test should edit active features"


def test_add_vector_is_unit_direction_times_strength():
    sae = random_sae(16, 8)
    with torch.no_grad():
        sae.W_dec.mul_(7.0)  # decoder rows of norm 7: `add` must normalise them
    spec = Intervention(layer=0, sae=sae, edits=[Edit(2, "add", 3.0), Edit(5, "add", -1.5)])
    compiled = CompiledIntervention.build(spec, sae, (), torch.float32)
    unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(compiled.add_vector, 3.0 * unit[2] - 1.5 * unit[5])
    assert compiled.latent is None, "add needs no encoder"
    hidden = torch.randn(2, 4, 16)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    out = compiled.apply(hidden, mask)
    assert torch.equal(out[~mask], hidden[~mask])
    torch.testing.assert_close(out[mask], hidden[mask] + compiled.add_vector)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_decoder_layers_found(arch):
    model = build_tiny_model(arch, 100, n_layers=3)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 3


class _TupleLayer(nn.Module):
    """A decoder block returning `(hidden, extra)` like older transformers layers."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return x + self.proj(x), "extra"


class _ToyLM(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_TupleLayer(d), _TupleLayer(d)])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        extras = []
        for layer in self.layers:
            h, extra = layer(h)
            extras.append(extra)
        return h, extras


def test_tuple_outputs_and_composition_on_one_layer():
    torch.manual_seed(0)
    model = _ToyLM()
    sae = random_sae(16, 8)
    ids = torch.tensor([[3, 4, 5, 6]])
    first = Intervention(layer=0, sae=sae, edits=[Edit(1, "add", 2.0)], positions="all")
    second = Intervention(layer=0, sae=sae, edits=[Edit(2, "scale", 3.0)], positions=[4, 6])
    compiled = [CompiledIntervention.build(s, sae, (4, 6), torch.float32) for s in (first, second)]
    with torch.no_grad():
        plain, _ = model(ids)
        with activate(model, compiled, special_tokens=None):
            steered, extras = model(ids)
        assert extras == ["extra", "extra"], "tuple outputs keep their other elements"
        # reference: apply the two edits one after the other by hand
        h0, _ = model.layers[0](model.embed(ids))
        h0 = compiled[0].apply(h0, None)
        h0 = compiled[1].apply(h0, torch.isin(ids, torch.tensor([4, 6])))
        expected, _ = model.layers[1](h0)
        torch.testing.assert_close(steered, expected)
        assert not torch.allclose(steered, plain)
        assert torch.equal(model(ids)[0], plain), "hooks removed"

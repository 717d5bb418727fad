"""The six guarantees of SteeredModel, on tiny random Llama / Qwen2 / GPT-2 models and on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from steer import Edit, Intervention, SpecError, SteeredModel
from tests.steer.helpers import capture_layer, chat_ids, greedy, hook_count, pad_batch, random_sae

PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hi"]


def _setup(model, tok, d_sae=96, architecture="standard"):
    sm = SteeredModel(model, tok)
    sae = random_sae(model.config.hidden_size, d_sae, architecture)
    layer = sm.n_layers // 2
    return sm, sae, layer


def _strong_spec(sae, layer, positions="special", strength=None):
    """An add edit (strong enough to change greedy tokens) plus a latent scale edit."""
    strength = strength if strength is not None else 40.0
    edits = [Edit(0, "add", strength), Edit(1, "scale", 5.0), Edit(2, "ablate")]
    return Intervention(layer=layer, sae=sae, edits=edits, positions=positions)


# -- guarantee checks (shared by tiny-model and SmolLM2 tests) --------------------------------------
def check_no_spec_bit_identical(model, tok, n_new=6):
    sm, sae, layer = _setup(model, tok)
    ids, mask = pad_batch(chat_ids(tok, PROMPTS[:2]), tok.pad_token_id)
    with torch.no_grad():
        plain_logits = model(input_ids=ids, attention_mask=mask).logits
        plain_tokens = greedy(model.generate, ids, mask, n_new, tok.pad_token_id)
        assert torch.equal(greedy(sm.generate, ids, mask, n_new, tok.pad_token_id), plain_tokens)
        with sm.steer():
            assert torch.equal(sm(input_ids=ids, attention_mask=mask).logits, plain_logits)
        with sm.steer(_strong_spec(sae, layer)):
            steered = sm(input_ids=ids, attention_mask=mask).logits
        assert not torch.equal(steered, plain_logits)
        assert torch.equal(sm(input_ids=ids, attention_mask=mask).logits, plain_logits), "hooks left behind"


def check_noop_latent_edit(model, tok, architecture):
    sm, sae, layer = _setup(model, tok, architecture=architecture)
    with torch.no_grad():
        sae.b_enc[3] = -1e4  # feature 3 never fires: setting it to 0 or ablating it changes nothing
    ids, mask = pad_batch(chat_ids(tok, PROMPTS), tok.pad_token_id)
    noop = Intervention(
        layer=layer,
        sae=sae,
        edits=[Edit(1, "scale", 1.0), Edit(2, "scale", 1.0), Edit(3, "set", 0.0)],
        positions="all",
    )
    ablate_dead = Intervention(layer=layer, sae=sae, edits=[Edit(3, "ablate")], positions="special")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with sm.steer(noop, ablate_dead):
            steered = sm(input_ids=ids, attention_mask=mask).logits
        with sm.steer(Intervention(layer=layer, sae=sae, edits=[Edit(1, "set", 5.0)], positions="all")):
            changed = sm(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(steered[real], plain[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed[real], plain[real], atol=1e-3)


def check_special_only_touches_special(model, tok, architecture="standard"):
    sm, sae, layer = _setup(model, tok, architecture=architecture)
    ids, mask = pad_batch(chat_ids(tok, PROMPTS), tok.pad_token_id)
    special = sm.special_tokens.mask(ids, mask)
    encoded_rows: list[int] = []
    sae_rows: list[int] = []
    original_encode, original_normalize = sae.encode, sae.normalize_in
    sae.encode = lambda x: (encoded_rows.append(x.shape[0]), original_encode(x))[1]
    sae.normalize_in = lambda x: (sae_rows.append(x.shape[0]), original_normalize(x))[1]
    with torch.no_grad():
        with capture_layer(model, layer) as plain:
            model(input_ids=ids, attention_mask=mask)
        with sm.steer(_strong_spec(sae, layer)), capture_layer(model, layer) as steered:
            sm(input_ids=ids, attention_mask=mask)
    plain_h, steered_h = plain[0], steered[0]
    assert torch.equal(steered_h[~special], plain_h[~special])
    assert (steered_h[special] - plain_h[special]).norm(dim=-1).min() > 1.0
    assert sae_rows == [int(special.sum())], "the SAE sees only the gathered special positions"
    assert encoded_rows == [], (
        "no dense encode (ReLU: a few encoder columns; TopK: pre-activations + threshold)"
    )


def check_cache_equals_recompute(model, tok, positions, n_new=8, strength=None):
    sm, sae, layer = _setup(model, tok)
    ids, mask = pad_batch(chat_ids(tok, PROMPTS[:1]), tok.pad_token_id)
    spec = _strong_spec(sae, layer, positions, strength)
    with torch.no_grad():
        plain = greedy(model.generate, ids, mask, n_new, tok.pad_token_id)
        with sm.steer(spec):
            cached = greedy(sm.generate, ids, mask, n_new, tok.pad_token_id, use_cache=True)
            recomputed = greedy(sm.generate, ids, mask, n_new, tok.pad_token_id, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, plain), "the spec should change the greedy tokens"


def check_left_padding(model, tok, n_new=6):
    sm, sae, layer = _setup(model, tok)
    seqs = chat_ids(tok, PROMPTS)
    ids, mask = pad_batch(seqs, tok.pad_token_id, side="left")
    spec = [
        _strong_spec(sae, layer),
        Intervention(layer=layer - 1, sae=sae, edits=[Edit(4, "add", 5.0)], positions="all"),
    ]
    with torch.no_grad(), sm.steer(spec):
        batched = greedy(sm.generate, ids, mask, n_new, tok.pad_token_id)
        for row, seq in enumerate(seqs):
            single_ids, single_mask = pad_batch([seq], tok.pad_token_id)
            alone = greedy(sm.generate, single_ids, single_mask, n_new, tok.pad_token_id)
            assert torch.equal(batched[row], alone[0]), f"row {row} differs from the prompt alone"


def check_mixed_rows(model, tok, n_new=6):
    """Each row of one batch under its own spec (or none) replies as it does alone under that spec."""
    sm, sae, layer = _setup(model, tok)
    seqs = chat_ids(tok, PROMPTS)
    ids, mask = pad_batch(seqs, tok.pad_token_id, side="left")
    specs = [
        _strong_spec(sae, layer),
        None,
        Intervention(layer=layer - 1, sae=sae, edits=[Edit(4, "add", 30.0)], positions="generated"),
    ]
    with torch.no_grad():
        plain_batched = greedy(sm.generate, ids, mask, n_new, tok.pad_token_id)
        plain_logits = sm(input_ids=ids, attention_mask=mask).logits
        with sm.steer(specs[0], rows=[0]), sm.steer(specs[2], rows=[2]):
            mixed = greedy(sm.generate, ids, mask, n_new, tok.pad_token_id)
            mixed_logits = sm(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(mixed_logits[1], plain_logits[1]), "an unsteered row must be bit-identical"
        assert not torch.equal(mixed_logits[0], plain_logits[0]), "row 0's special-token edit should act"
        assert torch.equal(mixed[1], plain_batched[1])
        for row, (seq, spec) in enumerate(zip(seqs, specs, strict=True)):
            single_ids, single_mask = pad_batch([seq], tok.pad_token_id)
            with sm.steer(spec):
                alone = greedy(sm.generate, single_ids, single_mask, n_new, tok.pad_token_id)
            assert torch.equal(mixed[row], alone[0]), f"row {row} differs from its spec alone"
        assert not torch.equal(mixed[2], plain_batched[2]), "row 2's generated-token edit should act"
        with pytest.raises(SpecError, match="batch of 3"), sm.steer(specs[0], rows=[3]):
            sm(input_ids=ids, attention_mask=mask)


def check_hooks_removed(model, tok):
    sm, sae, layer = _setup(model, tok)
    before = hook_count(model)
    ids, mask = pad_batch(chat_ids(tok, PROMPTS[:1]), tok.pad_token_id)
    with sm.steer(_strong_spec(sae, layer), _strong_spec(sae, 0)):
        assert hook_count(model) == before + 3
        assert sm.active
    assert hook_count(model) == before and not sm.active
    with pytest.raises(RuntimeError, match="boom"), sm.steer(_strong_spec(sae, layer)), torch.no_grad():
        sm(input_ids=ids, attention_mask=mask)
        raise RuntimeError("boom")
    assert hook_count(model) == before and not sm.active
    bad = Intervention(layer=sm.n_layers, sae=sae, edits=[Edit(0)])
    with pytest.raises(SpecError, match="out of range"), sm.steer(_strong_spec(sae, layer), bad):
        pass
    assert hook_count(model) == before


# -- tiny random models of several architectures -------------------------------------------------
def test_no_spec_is_bit_identical(tiny_model):
    check_no_spec_bit_identical(*tiny_model)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_noop_latent_edit_keeps_outputs(tiny_model, architecture):
    check_noop_latent_edit(*tiny_model, architecture)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_special_positions_only(tiny_model, architecture):
    check_special_only_touches_special(*tiny_model, architecture)


@pytest.mark.parametrize("positions", ["special", "generated"])
def test_kv_cache_equals_recompute(tiny_model, positions):
    check_cache_equals_recompute(*tiny_model, positions)


def test_left_padded_batch_equals_single(tiny_model):
    check_left_padding(*tiny_model)


def test_mixed_specs_per_row(tiny_model):
    check_mixed_rows(*tiny_model)


def test_hooks_removed_on_exit_and_exception(tiny_model):
    check_hooks_removed(*tiny_model)


# -- the default SmolLM2 (short) -----------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_no_spec_and_hooks(default_model):
    check_no_spec_bit_identical(*default_model, n_new=3)
    check_hooks_removed(*default_model)


@pytest.mark.integration
def test_smollm2_noop_and_special_only(default_model):
    check_noop_latent_edit(*default_model, "jumprelu")
    check_special_only_touches_special(*default_model)


@pytest.mark.integration
def test_smollm2_cache_and_padding(default_model):
    check_cache_equals_recompute(*default_model, "special", n_new=8, strength=1000.0)  # residual norm ~170
    check_left_padding(*default_model, n_new=4)


def test_position_modes_select_expected_positions(chatml_tokenizer):
    from tests.conftest import build_tiny_model

    tok = chatml_tokenizer
    model = build_tiny_model("llama", len(tok))
    sm, sae, layer = _setup(model, tok)
    ids, mask = pad_batch(chat_ids(tok, PROMPTS[:2]), tok.pad_token_id)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    expected = {
        "all": mask.bool(),
        "prompt": mask.bool(),
        "generated": torch.zeros_like(mask, dtype=torch.bool),
        ("<|im_start|>",): (ids == im_start) & mask.bool(),
    }
    with torch.no_grad(), capture_layer(model, layer) as plain:
        model(input_ids=ids, attention_mask=mask)
    for positions, want in expected.items():
        spec = Intervention(layer=layer, sae=sae, edits=[Edit(0, "add", 10.0)], positions=positions)
        if isinstance(positions, tuple):
            spec.positions = list(positions)
        with torch.no_grad(), sm.steer(spec), capture_layer(model, layer) as seen:
            sm(input_ids=ids, attention_mask=mask)
        changed = (seen[0] - plain[0]).norm(dim=-1) > 1.0
        assert torch.equal(changed, want), positions
    # during generation, "generated" edits exactly the new positions: prompt residuals stay as they were
    spec = Intervention(layer=layer, sae=sae, edits=[Edit(0, "add", 10.0)], positions="generated")
    with torch.no_grad(), capture_layer(model, layer) as plain_steps:
        greedy(model.generate, ids, mask, 3, tok.pad_token_id)
    with torch.no_grad(), sm.steer(spec), capture_layer(model, layer) as seen:
        greedy(sm.generate, ids, mask, 3, tok.pad_token_id)
    assert len(seen) == len(plain_steps) == 3
    assert torch.equal(seen[0], plain_steps[0]), "the prefill (prompt) is untouched"
    torch.testing.assert_close((seen[1] - plain_steps[1]).norm(dim=-1), torch.full((2, 1), 10.0))

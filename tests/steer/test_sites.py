"""Steering at the other hook sites (`steer.sites`): attention `hook_z` (the input of o_proj), the MLP output, and
transcoders (encode the MLP input, add `(f' - f) @ W_dec` to the MLP output), on tiny Gemma 3 (whose MLP output
is its `post_feedforward_layernorm`'s), Qwen3 and Llama models."""

from __future__ import annotations

import pytest
import torch

from steer import Edit, Intervention, SpecError, SteeredModel
from steer.hooks import decoder_layers
from steer.sae import SAE
from steer.sites import point_module
from tests.chat_families import family_model, family_tokenizer
from tests.steer.helpers import chat_ids, greedy, hook_count, pad_batch, random_sae

PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hi"]
LAYER = 1
FAMILIES = ("gemma3", "qwen3", "llama3")
TRANSCODERS = ("transcoder", "jumprelu_skip_transcoder")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(SteeredModel, tokenizer) of a tiny model of each family (d_model 48: the attention width is 64)."""
    tok = family_tokenizer(request.param)
    return SteeredModel(family_model(request.param, d_model=48), tok), tok


def site_sae(sm: SteeredModel, kind: str, architecture: str = "standard", seed: int = 0) -> SAE:
    """A random SAE (or transcoder) trained, by its metadata, on `kind` of layer `LAYER`."""
    if kind == "attn_z":
        d_in = point_module(decoder_layers(sm.model)[LAYER], "attn_in")[0].in_features
        return random_sae(d_in, 32, architecture, seed, metadata={"hook_name": f"blocks.{LAYER}.attn.hook_z"})
    if kind in ("attn_out", "mlp_out"):
        hook = "hook_attn_out" if kind == "attn_out" else "hook_mlp_out"
        return random_sae(
            sm.d_model, 32, architecture, seed, metadata={"hook_name": f"blocks.{LAYER}.{hook}"}
        )
    meta = {"hook_name": f"blocks.{LAYER}.hook_mlp_in", "hook_name_out": f"blocks.{LAYER}.hook_mlp_out"}
    sae = random_sae(sm.d_model, 32, architecture, seed, d_out=sm.d_model, metadata=meta)
    if sae.skip:
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.5)  # cancels in the delta: must change nothing
    return sae


def _inputs(tok, n=3):
    return pad_batch(chat_ids(tok, PROMPTS[:n]), tok.pad_token_id)


class WritePoint:
    """What the MLP received and what its branch wrote, before and after the steering hooks, per forward."""

    def __init__(self, sm: SteeredModel) -> None:
        block = decoder_layers(sm.model)[LAYER]
        self.mlp_in, _ = point_module(block, "mlp_in")
        self.out, _ = point_module(block, "mlp_out")
        self.inputs: list[torch.Tensor] = []
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def __enter__(self):
        self.handles = [
            self.mlp_in.register_forward_pre_hook(lambda m, a: self.inputs.append(a[0].detach().clone())),
            self.out.register_forward_hook(
                lambda m, a, o: self.before.append(o.detach().clone()), prepend=True
            ),
            self.out.register_forward_hook(lambda m, a, o: self.after.append(o.detach().clone())),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("architecture", TRANSCODERS)
def test_a_zero_transcoder_edit_is_bit_identical(family, architecture):
    sm, tok = family
    sae = site_sae(sm, "transcoder", architecture)
    ids, mask = _inputs(tok)
    zero = [Edit(1, "scale", 1.0), Edit(2, "add", 0.0), Edit(3, "scale", 1.0)]
    with torch.no_grad():
        plain = sm(input_ids=ids, attention_mask=mask).logits
        for positions in ("all", "special"):
            with sm.steer(Intervention(layer=LAYER, sae=sae, edits=zero, positions=positions)) as report:
                steered = sm(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(steered, plain), positions
            assert report.positions > 0


@pytest.mark.parametrize("op", ["add", "scale", "set", "ablate"])
@pytest.mark.parametrize("architecture", TRANSCODERS)
def test_a_transcoder_edit_adds_exactly_its_decoder_delta_at_special_positions(family, architecture, op):
    sm, tok = family
    sae = site_sae(sm, "transcoder", architecture)
    ids, mask = _inputs(tok)
    special = sm.special_tokens.mask(ids, mask)
    strength = {"add": 4.0, "scale": 3.0, "set": 2.5, "ablate": 0.0}[op]
    spec = Intervention(layer=LAYER, sae=sae, edits=[Edit(5, op, strength)], positions="special")
    with torch.no_grad(), sm.steer(spec) as report, WritePoint(sm) as seen:
        sm(input_ids=ids, attention_mask=mask)
        x = seen.inputs[0][special]
        f = sae.encode(x)[:, 5]
        if op == "add":
            expected = strength * sae.W_dec[5] / sae.W_dec[5].norm()
            expected = expected.expand(len(x), -1)
        else:
            new = {"scale": f * strength, "set": torch.full_like(f, strength), "ablate": torch.zeros_like(f)}[
                op
            ]
            expected = (new - f)[:, None] * sae.W_dec[5]
        if op in ("scale", "ablate"):
            assert (f > 0).any(), "the feature must fire somewhere for the edit to show"
        delta = seen.after[0] - seen.before[0]
    assert torch.equal(delta[~special], torch.zeros_like(delta[~special])), "only special positions change"
    torch.testing.assert_close(delta[special], expected, rtol=1e-5, atol=1e-5)
    assert report.positions == int(special.sum())


@pytest.mark.parametrize("kind", ["attn_z", "attn_out", "mlp_out", "transcoder"])
def test_kv_cache_equals_recompute(family, kind):
    sm, tok = family
    sae = site_sae(sm, kind, "jumprelu_transcoder" if kind == "transcoder" else "jumprelu")
    ids, mask = _inputs(tok, 2)
    edits = [Edit(0, "add", 60.0), Edit(1, "set", 30.0), Edit(2, "ablate")]
    with torch.no_grad():
        plain = greedy(sm.generate, ids, mask, 6, tok.pad_token_id)
        for positions in ("special", "generated"):
            with sm.steer(Intervention(layer=LAYER, sae=sae, edits=edits, positions=positions)):
                cached = greedy(sm.generate, ids, mask, 6, tok.pad_token_id, use_cache=True)
                recomputed = greedy(sm.generate, ids, mask, 6, tok.pad_token_id, use_cache=False)
            assert torch.equal(cached, recomputed), positions
            assert not torch.equal(cached, plain), f"the {positions} edit should change the greedy tokens"


@pytest.mark.parametrize("kind", ["attn_z", "attn_out", "mlp_out"])
def test_sae_sites_edit_only_their_positions(family, kind):
    """An SAE edit at special positions leaves the other positions of its layer bit-identical."""
    sm, tok = family
    sae = site_sae(sm, kind)
    ids, mask = _inputs(tok)
    special = sm.special_tokens.mask(ids, mask)
    module, side = point_module(decoder_layers(sm.model)[LAYER], "attn_in" if kind == "attn_z" else kind)
    spec = Intervention(layer=LAYER, sae=sae, edits=[Edit(0, "add", 5.0), Edit(1, "set", 3.0)])

    def run(steered: bool) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        with torch.no_grad(), sm.steer(spec if steered else None):  # registered after: runs after the edit
            if side == "input":
                handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
            else:
                handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
            sm(input_ids=ids, attention_mask=mask)
            handle.remove()
        return seen[0]

    steered, plain = run(True), run(False)
    assert torch.equal(steered[~special], plain[~special])
    assert (steered[special] - plain[special]).norm(dim=-1).min() > 1.0


@pytest.mark.parametrize("op", ["add", "set"])
def test_an_attn_out_edit_adds_exactly_its_decoder_delta_at_special_positions(family, op):
    """`hook_attn_out` SAEs edit what attention adds to the residual: Gemma's post-attention norm output (Gemma's
    `post_attention_layernorm` follows attention), else `o_proj`'s output (Llama's is the pre-MLP norm)."""
    sm, tok = family
    sae = site_sae(sm, "attn_out")
    block = decoder_layers(sm.model)[LAYER]
    module, side = point_module(block, "attn_out")
    gemma = hasattr(block, "pre_feedforward_layernorm")
    assert side == "output" and module is (
        block.post_attention_layernorm if gemma else block.self_attn.o_proj
    )
    ids, mask = _inputs(tok)
    special = sm.special_tokens.mask(ids, mask)
    spec = Intervention(layer=LAYER, sae=sae, edits=[Edit(5, op, 2.5)], positions="special")
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    with torch.no_grad(), sm.steer(spec) as report:
        handles = [
            module.register_forward_hook(lambda m, a, o: before.append(o.detach().clone()), prepend=True),
            module.register_forward_hook(lambda m, a, o: after.append(o.detach().clone())),
        ]
        sm(input_ids=ids, attention_mask=mask)
        for handle in handles:
            handle.remove()
    x = before[0][special]
    if op == "add":
        expected = (2.5 * sae.W_dec[5] / sae.W_dec[5].norm()).expand(len(x), -1)
    else:
        expected = (2.5 - sae.encode(x)[:, 5])[:, None] * sae.W_dec[5]
    delta = after[0] - before[0]
    assert torch.equal(delta[~special], torch.zeros_like(delta[~special])), "only special positions change"
    torch.testing.assert_close(delta[special], expected, rtol=1e-5, atol=1e-5)
    assert report.positions == int(special.sum())


def test_mixed_rows_and_hooks_removed(family):
    """A transcoder on row 0 and an attn_z SAE on row 2 of one batch: row 1 runs the plain model bit for bit,
    each steered row replies as it does alone; no hook is left behind."""
    sm, tok = family
    transcoder, attn = site_sae(sm, "transcoder", "jumprelu_transcoder"), site_sae(sm, "attn_z")
    specs = [
        Intervention(layer=LAYER, sae=transcoder, edits=[Edit(0, "add", 60.0), Edit(1, "set", 30.0)]),
        None,
        Intervention(layer=LAYER, sae=attn, edits=[Edit(0, "add", 60.0)], positions="generated"),
    ]
    seqs = chat_ids(tok, PROMPTS)
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    before = hook_count(sm.model)
    with torch.no_grad():
        plain = greedy(sm.generate, ids, mask, 5, tok.pad_token_id)
        with sm.steer(specs[0], rows=[0]), sm.steer(specs[2], rows=[2]):
            assert hook_count(sm.model) == before + 1 + 2 + 1  # placement, transcoder read + write, attn
            mixed = greedy(sm.generate, ids, mask, 5, tok.pad_token_id)
        assert hook_count(sm.model) == before
        assert torch.equal(mixed[1], plain[1])
        for row, spec in ((0, specs[0]), (2, specs[2])):
            single_ids, single_mask = pad_batch([seqs[row]], tok.pad_token_id)
            with sm.steer(spec):
                alone = greedy(sm.generate, single_ids, single_mask, 5, tok.pad_token_id)
            assert torch.equal(mixed[row], alone[0]), f"row {row} differs from its spec alone"
            assert not torch.equal(mixed[row], plain[row])


def test_sites_that_cannot_be_placed_or_do_not_fit(family):
    sm, tok = family
    embed = random_sae(sm.d_model, 16, metadata={"hook_name": "hook_embed"})
    with pytest.raises(SpecError, match="reads hook_embed, which fast-steer cannot place a steering hook on"):
        sm.compile(Intervention(layer=0, sae=embed, edits=[Edit(0)]))
    resid_pre = random_sae(sm.d_model, 16, metadata={"hook_name": "blocks.0.hook_resid_pre"})
    with pytest.raises(SpecError, match="blocks.0.hook_resid_pre, which fast-steer cannot place"):
        sm.compile(Intervention(layer=0, sae=resid_pre, edits=[Edit(0)]))
    wrong_width = random_sae(sm.d_model, 16, metadata={"hook_name": f"blocks.{LAYER}.attn.hook_z"})
    heads = point_module(decoder_layers(sm.model)[LAYER], "attn_in")[0].in_features
    if heads != sm.d_model:  # Gemma 3 and Qwen3 set head_dim apart from hidden_size / heads; Llama does not
        with pytest.raises(
            SpecError, match=rf"reads d_in=48 but the model's attn_z width \(the o_proj input\) is {heads}"
        ):
            sm.compile(Intervention(layer=LAYER, sae=wrong_width, edits=[Edit(0)]))
    with pytest.raises(SpecError, match="trained on layer 1"):
        sm.compile(Intervention(layer=0, sae=site_sae(sm, "transcoder", "transcoder"), edits=[Edit(0)]))

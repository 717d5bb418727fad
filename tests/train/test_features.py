"""Feature discovery on a tiny model with a planted `<|im_start|>` feature, and top-activating contexts."""

from __future__ import annotations

import json

import pytest
import torch

from steer.positions import resolve_special_tokens
from steer.sae import SAEConfig, build_sae
from tests.conftest import build_tiny_model, read_conversations
from train.features import discover_features, feature_activations, top_contexts
from train.harvest import Harvester
from train.sequences import bucket_batches, fast_sequences

LAYER = 1
PLANTED = 7
D_SAE = 32


def planted_sae(model, tokenizer, conversations, architecture="standard"):
    """An SAE whose feature PLANTED reads the direction separating <|im_start|> residuals from the rest."""
    specials = resolve_special_tokens(tokenizer)
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    seqs = fast_sequences(conversations, tokenizer)
    harvester = Harvester(model, LAYER)
    start, other = [], []
    for batch in bucket_batches(seqs, 4096, tokenizer.pad_token_id, seed=None):
        for index, resid in zip(batch.indices, harvester.per_sequence(batch), strict=True):
            ids = torch.tensor(seqs[index])
            marked = specials.mask(ids)
            is_start = ids == start_id
            is_start[0] = False
            start.append(resid[is_start])
            other.append(resid[~marked])
    start, other = torch.cat(start), torch.cat(other)
    u = start.mean(0) - other.mean(0)
    u = u / u.norm()
    lo, hi = (start @ u).min(), (other @ u).max()
    assert lo > hi, (
        "the tiny model's <|im_start|> residuals should be linearly separable from ordinary tokens"
    )
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture=architecture, d_in=model.config.hidden_size, d_sae=D_SAE))
    scale = 50.0 / float(lo - hi)
    with torch.no_grad():
        sae.W_enc[:, PLANTED] = scale * u
        sae.b_enc[PLANTED] = -scale * float(lo + hi) / 2
    sae.cfg.metadata["hook_name"] = f"blocks.{LAYER}.hook_resid_post"
    return sae


@pytest.fixture(scope="module")
def planted(chatml_tokenizer):
    model = build_tiny_model("llama", len(chatml_tokenizer))
    conversations = read_conversations(n=16)
    return model, chatml_tokenizer, planted_sae(model, chatml_tokenizer, conversations), conversations


def test_planted_feature_tops_im_start(planted):
    model, tok, sae, conversations = planted
    report = discover_features(model, tok, sae, LAYER, conversations, top_k=5, progress=False)
    assert report.n_conversations == len(conversations)
    top = report.top("<|im_start|>")
    assert top[0].feature == PLANTED
    assert top[0].fire_rate == 1.0
    assert top[0].mean_max_activation > 2 * top[1].mean_max_activation
    # The planted feature is silent on every other token type (its threshold sits below <|im_start|>).
    for entry in report.token_types:
        assert entry.n_conversations > 0
        if entry.token != "<|im_start|>":
            assert PLANTED not in [s.feature for s in entry.top]
    types = [e.token for e in report.token_types]
    assert types[:2] == ["<|im_start|>", "<|im_end|>"] and len(types) > 2  # role-name tokens follow
    data = json.loads(report.to_json())
    assert data["token_types"]["<|im_start|>"]["top"][0]["feature"] == PLANTED
    assert data["special_tokens"]["special_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_top_contexts_highlight_the_activating_token(planted):
    model, tok, sae, conversations = planted
    contexts = top_contexts(PLANTED, model, tok, sae, LAYER, conversations, k=4, window=3, progress=False)
    assert len(contexts) == 4
    assert [c.activation for c in contexts] == sorted((c.activation for c in contexts), reverse=True)
    for ctx in contexts:
        assert ctx.token == "<|im_start|>" and ctx.label == "<|im_start|>" and ctx.position > 0
        assert len(ctx.before) == 3 and len(ctx.after) <= 3
        assert "[[<|im_start|>]]" in ctx.render("brackets")
        assert "\033[1;31m<|im_start|>\033[0m" in ctx.render("ansi")
        assert "\n" not in ctx.render()
    assert len({c.conversation for c in contexts}) == 4


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_single_feature_activations_match_full_encode(architecture):
    torch.manual_seed(1)
    cfg = SAEConfig(architecture=architecture, d_in=16, d_sae=24, k=4 if architecture == "topk" else None)
    sae = build_sae(cfg)
    with torch.no_grad():
        sae.b_enc.normal_()
        if architecture == "jumprelu":
            sae.threshold.uniform_(0, 0.5)
    x = torch.randn(50, 16)
    for feature in (0, 5, 23):
        torch.testing.assert_close(feature_activations(sae, x, feature), sae.encode(x)[:, feature])


def test_errors(planted):
    model, tok, sae, conversations = planted
    with pytest.raises(ValueError, match="feature 99 out of range"):
        top_contexts(99, model, tok, sae, LAYER, conversations[:2], progress=False)
    wrong = build_sae(SAEConfig(architecture="standard", d_in=32, d_sae=8))
    with pytest.raises(ValueError, match="d_in=32"):
        discover_features(model, tok, wrong, LAYER, conversations[:2], progress=False)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        discover_features(model, tok, sae, 9, conversations[:2], progress=False)

"""Evaluation metrics on a tiny model, checked against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from steer.positions import resolve_special_tokens
from steer.sae import SAEConfig, build_sae
from tests.conftest import build_tiny_model, read_conversations
from train.evaluate import EvalConfig, evaluate_sae, format_table
from train.sequences import fast_sequences

LAYER = 1


@pytest.fixture(scope="module")
def setup(chatml_tokenizer):
    model = build_tiny_model("llama", len(chatml_tokenizer))
    convs = read_conversations("taskmaster4_coffee.jsonl", 6)
    return model, chatml_tokenizer, convs


def _exact_sae(d: int):
    """relu(x) - relu(-x) = x: a standard SAE that reconstructs perfectly."""
    sae = build_sae(SAEConfig(architecture="standard", d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_metrics_match_direct_computation(setup):
    model, tok, convs = setup
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="standard", d_in=64, d_sae=128))
    with torch.no_grad():
        sae.b_dec.normal_()
    cfg = EvalConfig(max_len=120, token_budget=300)
    res = evaluate_sae(sae, model, tok, convs, LAYER, cfg, progress=False)

    special = resolve_special_tokens(tok)
    seq_mse, seq_st, xs, recons, ce, n_ce = [], [], [], [], 0.0, 0
    with torch.no_grad():
        for ids in fast_sequences(convs, tok, max_len=120):
            out = model(torch.tensor([ids]), output_hidden_states=True)
            x = out.hidden_states[LAYER + 1][0]
            ce += torch.nn.functional.cross_entropy(
                out.logits[0, :-1], torch.tensor(ids[1:]), reduction="sum"
            ).item()
            n_ce += len(ids) - 1
            r = sae(x)
            err = (r - x).pow(2).mean(-1)
            seq_mse.append(err.mean().item())
            m = special.mask(torch.tensor(ids))
            seq_st.append(err[m].mean().item())
            xs.append(x)
            recons.append(r)
    x, r = torch.cat(xs), torch.cat(recons)
    m = res.metrics
    assert res.n_sequences == 6 and res.n_tokens == x.shape[0]
    assert m["mse"] == pytest.approx(sum(seq_mse) / 6, rel=1e-4)
    assert m["log2_mse"] == pytest.approx(math.log2(m["mse"]))
    assert m["mse_st"] == pytest.approx(sum(seq_st) / 6, rel=1e-4)
    ev = 1 - (r - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert m["explained_variance"] == pytest.approx(ev.item(), rel=1e-4)
    assert m["l0"] == pytest.approx((sae.encode(x) > 0).sum(-1).float().mean().item(), rel=1e-5)
    assert m["ce_clean"] == pytest.approx(ce / n_ce, rel=1e-5)
    assert abs(m["delta_lm_loss"]) > 1e-3  # a poor reconstruction changes the predictions
    assert m["delta_lm_loss_pct"] == pytest.approx(100 * m["delta_lm_loss"] / m["ce_clean"])
    by_type = res.mse_by_token_type
    assert by_type["first token"]["tokens"] == 6
    assert by_type["<|im_start|>"]["tokens"] > 6 and "other tokens" in by_type
    assert sum(v["tokens"] for v in by_type.values()) == res.n_tokens
    text = format_table(res)
    assert "MSE_st" in text and "<|im_start|>" in text


def test_exact_reconstruction_has_zero_delta_lm_loss(setup):
    model, tok, convs = setup
    res = evaluate_sae(_exact_sae(64), model, tok, convs, LAYER, EvalConfig(max_len=120), progress=False)
    m = res.metrics
    assert m["mse"] < 1e-10 and m["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert abs(m["delta_lm_loss"]) < 1e-4
    assert m["dense_share"] == pytest.approx(1.0)  # every coordinate's +/- feature fires often


def test_bdec_only_sae_equals_its_baseline_and_is_all_dead(setup):
    model, tok, convs = setup
    sae = build_sae(SAEConfig(architecture="standard", d_in=64, d_sae=128))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_dec.fill_(0.1)
    res = evaluate_sae(sae, model, tok, convs, LAYER, EvalConfig(lm_loss=False), progress=False)
    m = res.metrics
    assert m["explained_variance"] == pytest.approx(m["explained_variance_bdec_only"], abs=1e-6)
    assert m["explained_variance"] < 0.0 and m["dead_share"] == 1.0 and m["l0"] == 0.0
    assert "delta_lm_loss" not in m


def test_bad_inputs_are_reported(setup):
    model, tok, convs = setup
    sae = build_sae(SAEConfig(architecture="standard", d_in=32, d_sae=64))
    with pytest.raises(ValueError, match="d_in=32 does not match"):
        evaluate_sae(sae, model, tok, convs, LAYER, progress=False)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        evaluate_sae(_exact_sae(64), model, tok, convs, 9, progress=False)


def test_first_token_exclusion_follows_training_metadata(setup):
    """An SAE trained without position 0 is scored without it, while 'first token' stays reported."""
    model, tok, convs = setup
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="standard", d_in=64, d_sae=128))
    cfg = EvalConfig(max_len=120, token_budget=300)
    kept = evaluate_sae(sae, model, tok, convs, LAYER, cfg, progress=False)
    sae.cfg.metadata["exclude_first_token"] = True
    skipped = evaluate_sae(sae, model, tok, convs, LAYER, cfg, progress=False)
    assert not kept.config["exclude_first_token"] and skipped.config["exclude_first_token"]
    assert skipped.n_tokens == kept.n_tokens - len(convs)
    assert skipped.mse_by_token_type["first token"] == kept.mse_by_token_type["first token"]
    assert skipped.metrics["mse"] != pytest.approx(kept.metrics["mse"])
    assert skipped.metrics["delta_lm_loss"] != pytest.approx(kept.metrics["delta_lm_loss"])
    assert "left out (as in training)" in format_table(skipped)
    forced = evaluate_sae(
        sae, model, tok, convs, LAYER, EvalConfig(max_len=120, exclude_first_token=False), progress=False
    )
    assert forced.metrics["mse"] == pytest.approx(kept.metrics["mse"])

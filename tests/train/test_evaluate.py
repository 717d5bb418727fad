"""Evaluation metrics on tiny models, checked against direct computations and against a reference that runs
a clean and a spliced forward per conversation; CUDA against CPU where a GPU is present."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from steer.positions import resolve_special_tokens
from steer.sae import SAEConfig, build_sae
from tests.conftest import build_tiny_model, read_conversations
from train.evaluate import EvalConfig, evaluate_sae, format_table
from train.harvest import decoder_layers
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
    assert m["mse_st_template"] == pytest.approx(sum(seq_st) / 6, rel=1e-4)
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


def _reference_metrics(sae, model, tok, convs, layer, max_len, skip_first) -> dict:
    """The metrics from one conversation at a time: a clean forward, then a second forward with the SAE's
    reconstruction spliced in after `layer` (the definitions of the module docstring, written out)."""
    special = resolve_special_tokens(tok)
    table_11 = special.subset(special.special_ids, ("user", "assistant"))  # ChatML: no begin-of-text token
    block = decoder_layers(model)[layer]
    seq_mse, seq_st, seq_st_template, xs, recons, feats, by_type = [], [], [], [], [], [], {}
    ce_clean = ce_spliced = 0.0
    n_ce = 0
    for ids in fast_sequences(convs, tok, max_len=max_len):
        ids_t = torch.tensor([ids])
        seen = []
        handle = block.register_forward_hook(lambda _m, _a, output, seen=seen: seen.append(output))
        try:
            out = model(ids_t)
        finally:
            handle.remove()
        x = (seen[0] if torch.is_tensor(seen[0]) else seen[0][0])[0]
        f = sae.encode(x)
        r = sae.decode(f)
        err = (r - x).pow(2).mean(-1)
        for pos, label in enumerate(special.labels(ids)):
            key = "first token" if pos == 0 else (label or "other tokens")
            s, n = by_type.get(key, (0.0, 0))
            by_type[key] = (s + err[pos].item(), n + 1)
        start = 1 if skip_first else 0
        seq_mse.append(err[start:].mean().item())
        for tokens, out_list in ((table_11, seq_st), (special, seq_st_template)):
            mask = tokens.mask(ids_t[0])
            if mask[start:].any():
                out_list.append(err[start:][mask[start:]].mean().item())
        xs.append(x[start:])
        recons.append(r[start:])
        feats.append(f[start:])
        spliced_x = torch.cat([x[:start], r[start:]])

        def splice(_module, _args, output, spliced_x=spliced_x):
            return (
                spliced_x.unsqueeze(0) if torch.is_tensor(output) else (spliced_x.unsqueeze(0), *output[1:])
            )

        handle = block.register_forward_hook(splice)
        try:
            spliced_logits = model(ids_t).logits[0]
        finally:
            handle.remove()
        targets = torch.tensor(ids[1:])
        ce_clean += F.cross_entropy(out.logits[0, :-1], targets, reduction="sum").item()
        ce_spliced += F.cross_entropy(spliced_logits[:-1], targets, reduction="sum").item()
        n_ce += len(ids) - 1
    x, r, f = torch.cat(xs), torch.cat(recons), torch.cat(feats)
    freq = (f > 0).double().mean(0)
    sst = (x.double() - x.double().mean(0)).pow(2).sum()
    return {
        "metrics": {
            "mse": sum(seq_mse) / len(seq_mse),
            "mse_st": sum(seq_st) / len(seq_st),
            "mse_st_template": sum(seq_st_template) / len(seq_st_template),
            "l0": (f > 0).sum(-1).double().mean().item(),
            "explained_variance": 1 - ((r - x).double().pow(2).sum() / sst).item(),
            "explained_variance_bdec_only": 1 - ((x - sae.b_dec).double().pow(2).sum() / sst).item(),
            "dead_share": (freq == 0).double().mean().item(),
            "dense_share": (freq > 0.1).double().mean().item(),
            "ce_clean": ce_clean / n_ce,
            "ce_spliced": ce_spliced / n_ce,
        },
        "by_type": {k: {"mse": s / n, "tokens": n} for k, (s, n) in by_type.items()},
        "tokens": len(x),
    }


def _assert_matches_reference(res, ref) -> None:
    assert res.n_tokens == ref["tokens"]
    for name, value in ref["metrics"].items():
        assert res.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert res.metrics["delta_lm_loss"] == pytest.approx(
        ref["metrics"]["ce_spliced"] - ref["metrics"]["ce_clean"], rel=1e-3, abs=1e-5
    )
    assert res.mse_by_token_type.keys() == ref["by_type"].keys()
    for label, v in ref["by_type"].items():
        assert res.mse_by_token_type[label]["tokens"] == v["tokens"], label
        assert res.mse_by_token_type[label]["mse"] == pytest.approx(v["mse"], rel=1e-4), label


@pytest.mark.parametrize(
    ("arch", "attn", "layer", "budget", "skip_first"),
    [
        ("llama", "sdpa", 1, 300, False),
        ("llama", "eager", 1, 300, True),
        ("llama", "sdpa", 3, 120, False),  # last block, one row per batch
        ("qwen2", "sdpa", 2, 500, True),
        ("gpt2", "eager", 1, 300, False),
        ("gpt2", "sdpa", 3, 300, True),
    ],
)
def test_one_batched_forward_equals_two_separate_forwards(
    chatml_tokenizer, arch, attn, layer, budget, skip_first
):
    """Clean and spliced rows share one forward (blocks 0..L once, 2B rows after): the same metrics as a
    clean and a spliced forward per conversation, on batches of one and of several rows."""
    model = build_tiny_model(arch, len(chatml_tokenizer))
    model.set_attn_implementation(attn)
    convs = read_conversations("taskmaster4_coffee.jsonl", 7)
    torch.manual_seed(1)
    sae = build_sae(SAEConfig(architecture="standard", d_in=64, d_sae=256))
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)  # some features never fire: dead_share is tested away from 0
        sae.b_dec.normal_(std=0.1)
    cfg = EvalConfig(max_len=120, token_budget=budget, exclude_first_token=skip_first)
    res = evaluate_sae(sae, model, chatml_tokenizer, convs, layer, cfg, progress=False)
    with torch.no_grad():
        ref = _reference_metrics(sae, model, chatml_tokenizer, convs, layer, 120, skip_first)
    _assert_matches_reference(res, ref)
    assert abs(res.metrics["delta_lm_loss"]) > 1e-3, "the splice must change the predictions"
    no_lm = evaluate_sae(
        sae, model, chatml_tokenizer, convs, layer, replace(cfg, lm_loss=False), progress=False
    )
    assert "ce_clean" not in no_lm.metrics
    for name in ("mse", "mse_st", "l0", "explained_variance", "dead_share", "dense_share"):
        assert no_lm.metrics[name] == pytest.approx(res.metrics[name], rel=1e-5, abs=1e-7), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_evaluation_equals_cpu(setup):
    model, tok, convs = setup
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=64, d_sae=256, k=8))
    cfg = EvalConfig(max_len=120, token_budget=300)
    cpu = evaluate_sae(sae, model, tok, convs, LAYER, cfg, progress=False)
    cuda = evaluate_sae(
        sae.to("cuda"), copy.deepcopy(model).to("cuda"), tok, convs, LAYER, cfg, progress=False
    )
    assert cuda.n_tokens == cpu.n_tokens
    for name, value in cpu.metrics.items():
        assert cuda.metrics[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
    assert cuda.mse_by_token_type.keys() == cpu.mse_by_token_type.keys()


@pytest.mark.integration
def test_paper_table_11_set_on_smollm2(default_model):
    """ChatML on SmolLM2: <|im_start|>, <|im_end|>, user and ass+istant; not system (reported apart)."""
    from train.evaluate import paper_st_tokens

    _, tok = default_model
    template = resolve_special_tokens(tok)
    paper = paper_st_tokens(template, tok).to_dict()
    assert paper["special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert paper["role_tokens"] == {"assistant": ["ass", "istant"], "user": ["user"]}
    assert "system" in template.to_dict()["roles"]


def test_several_saes_in_one_pass_match_one_at_a_time(setup):
    """`evaluate_saes` shares blocks 0..L and the clean logits; each SAE's numbers are its own evaluation's,
    also when one SAE leaves position 0 out and the other does not."""
    from train.evaluate import evaluate_saes

    model, tok, convs = setup
    torch.manual_seed(1)
    saes = [build_sae(SAEConfig(architecture="standard", d_in=64, d_sae=128)) for _ in range(3)]
    saes[1].metadata["exclude_first_token"] = True
    cfg = EvalConfig(max_len=120, token_budget=600)
    together = evaluate_saes(saes, model, tok, convs, LAYER, cfg, progress=False)
    assert [r.config["exclude_first_token"] for r in together] == [False, True, False]
    for sae, joint in zip(saes, together, strict=True):
        alone = evaluate_sae(sae, model, tok, convs, LAYER, cfg, progress=False)
        assert joint.n_tokens == alone.n_tokens
        for key, value in alone.metrics.items():
            assert joint.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert together[0].metrics["delta_lm_loss"] != pytest.approx(together[2].metrics["delta_lm_loss"])
    assert together[1].metrics["mse_st"] == pytest.approx(together[1].metrics["mse_st_after_first"])

"""Harvesting after layer L: equals hidden_states[L+1], stops after layer L, never returns padding."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_model, read_conversations
from train.compiled import AUTO_COMPILE_TOKENS, resolve_compile
from train.harvest import Harvester, compile_seconds, decoder_layers, harvest_throughput, hook_name
from train.sequences import bucket_batches, fast_sequences

LAYER = 1  # of 4: the tiny models have later layers to skip


@pytest.fixture
def batch_and_sequences(chatml_tokenizer):
    seqs = fast_sequences(read_conversations("gpteacher.jsonl", 8), chatml_tokenizer, max_len=400)
    batch = bucket_batches(seqs, token_budget=10**6, pad_id=chatml_tokenizer.pad_token_id)[0]
    assert len(set(batch.lengths)) > 1 and batch.padding_share > 0.1  # the test needs real padding
    return batch, seqs


def _reference(model, ids, layer):
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]


def test_residuals_equal_unpadded_hidden_states(tiny_model, batch_and_sequences):
    model, _ = tiny_model
    batch, seqs = batch_and_sequences
    harvester = Harvester(model, LAYER)
    per_seq = harvester.per_sequence(batch)
    refs = [_reference(model, seqs[i], LAYER) for i in batch.indices]
    for got, ref in zip(per_seq, refs, strict=True):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    flat = harvester(batch)  # real tokens only, in row order: no padding row sneaks in
    assert flat.shape == (batch.n_tokens, model.config.get_text_config().hidden_size)
    torch.testing.assert_close(flat, torch.cat(refs), atol=1e-5, rtol=1e-5)
    assert harvester.last_stats["real"] == batch.n_tokens and harvester.last_stats["padded"] == batch.n_padded


def test_forward_stops_after_layer(tiny_model, batch_and_sequences):
    model, _ = tiny_model
    batch, _ = batch_and_sequences
    calls = {"later": 0, "target": 0, "head": 0}
    layers = decoder_layers(model)
    handles = [layer.register_forward_hook(lambda *_: calls.__setitem__("later", calls["later"] + 1))
               for layer in layers[LAYER + 1 :]]  # fmt: skip
    handles.append(
        layers[LAYER].register_forward_pre_hook(lambda *_: calls.__setitem__("target", calls["target"] + 1))
    )
    handles.append(
        model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__("head", 1))
    )
    try:
        Harvester(model, LAYER)(batch)
    finally:
        for h in handles:
            h.remove()
    assert calls == {"later": 0, "target": 1, "head": 0}
    assert not layers[LAYER]._forward_hooks  # the stop hook is removed again


def test_exclusions(chatml_tokenizer, batch_and_sequences):
    model = build_tiny_model("llama", len(chatml_tokenizer))
    batch, _ = batch_and_sequences
    per_seq = Harvester(model, LAYER).per_sequence(batch)
    no_first = Harvester(model, LAYER, exclude_first_token=True)(batch)
    torch.testing.assert_close(no_first, torch.cat([s[1:] for s in per_seq]))
    harvester = Harvester(model, LAYER, max_norm_multiple=1.05)
    kept = harvester(batch)
    norms = torch.cat(per_seq).norm(dim=-1)
    expected = int((norms <= 1.05 * norms.median()).sum())
    assert len(kept) == expected < len(norms)
    assert harvester.last_stats["excluded_norm"] == len(norms) - expected
    assert kept.norm(dim=-1).max() <= 1.05 * norms.median() + 1e-4


def test_bfloat16_model_gives_float32_residuals(chatml_tokenizer, batch_and_sequences):
    model = build_tiny_model("qwen2", len(chatml_tokenizer)).to(torch.bfloat16)
    batch, _ = batch_and_sequences
    harvester = Harvester(model, LAYER)
    out = harvester(batch)
    assert harvester.dtype == torch.bfloat16 and out.dtype == torch.float32 and len(out) == batch.n_tokens


def test_bad_layer_and_hook_name(chatml_tokenizer):
    model = build_tiny_model("gpt2", len(chatml_tokenizer))
    with pytest.raises(ValueError, match=r"layer 4 out of range: .* layers 0\.\.3"):
        Harvester(model, 4)
    assert hook_name(3) == "blocks.3.hook_resid_post"
    assert Harvester(model, 3).d_in == 64  # the last layer is allowed


def test_harvest_throughput_report(chatml_tokenizer, batch_and_sequences):
    model = build_tiny_model("llama", len(chatml_tokenizer))
    batch, _ = batch_and_sequences
    report = harvest_throughput(model, [batch], LAYER, repeats=2)
    assert report["real_tokens"] == batch.n_tokens and report["padded_tokens"] == batch.n_padded
    assert report["bare_tokens_per_s"] > 0 and report["harvest_tokens_per_s"] > 0
    assert report["padding_share"] == pytest.approx(batch.padding_share)
    assert len(decoder_layers(model)) == 4  # the truncated stack was put back


@pytest.mark.integration
def test_default_model_layer_matches_hidden_states(default_model):
    model, tok = default_model
    seqs = fast_sequences(read_conversations("hh_rlhf_harmless_test.jsonl", 3), tok, max_len=256)
    batch = bucket_batches(seqs, 10**6, tok.pad_token_id)[0]
    per_seq = Harvester(model, 5).per_sequence(batch)
    for i, got in zip(batch.indices, per_seq, strict=True):
        torch.testing.assert_close(got, _reference(model, seqs[i], 5), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compiled_harvest_equals_eager_and_leaves_the_model_as_it_was(
    arch, chatml_tokenizer, batch_and_sequences
):
    import torch._dynamo.utils

    model = build_tiny_model(arch, len(chatml_tokenizer))
    batch, _ = batch_and_sequences
    eager = Harvester(model, LAYER)(batch)
    counters = torch._dynamo.utils.counters
    graphs, traces = counters["stats"]["unique_graphs"], counters["aot_autograd"]["total"]
    compiled = Harvester(model, LAYER, compile=True)
    layers = decoder_layers(model)
    seen = []  # the forward each layer runs with, read inside the call
    handles = [layer.register_forward_pre_hook(lambda m, _: seen.append(m.__dict__.get("forward")))
               for layer in layers]  # fmt: skip
    try:
        got = compiled(batch)
    finally:
        for h in handles:
            h.remove()
    assert seen == compiled.compiled and len(seen) == LAYER + 1  # compiled forwards, and only to layer L
    assert counters["stats"]["unique_graphs"] > graphs  # Inductor really compiled
    # each graph traced once: floats specialised up front, no restart to turn a symbolic float into a tensor
    assert counters["aot_autograd"]["total"] - traces == counters["stats"]["unique_graphs"] - graphs
    assert not torch._dynamo.config.specialize_float  # Dynamo's flag as it was outside the call
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
    assert all("forward" not in layer.__dict__ for layer in layers)  # the class's forward again
    torch.testing.assert_close(Harvester(model, LAYER)(batch), eager, atol=0, rtol=0)
    report = harvest_throughput(model, [batch], LAYER, repeats=1, compile=True)
    assert report["bare_tokens_per_s"] > 0 and report["harvest_tokens_per_s"] > 0
    assert compile_seconds(model, batch, LAYER) > 0  # Dynamo traces again after its reset


def test_vector_isas_probed_once_then_remembered(tmp_path, monkeypatch):
    from train.compiled import ISA_RECORD, vector_isas_trusted

    if platform.machine() not in ("x86_64", "AMD64"):
        assert not vector_isas_trusted()
        return
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    record = tmp_path / ISA_RECORD
    trusted = vector_isas_trusted()  # Inductor's probe; a record only where every claimed ISA passed
    assert record.exists() == trusted
    if not trusted:
        return
    key = json.loads(record.read_text())
    assert key["torch"] == torch.__version__ and key["claimed"] and Path(key["compiler"][0]).is_file()
    assert vector_isas_trusted() and json.loads(record.read_text()) == key  # read back, unchanged
    record.write_text(json.dumps(key | {"torch": "0.0"}))  # another torch's verdict: probed again
    assert vector_isas_trusted() and json.loads(record.read_text()) == key


def test_compile_without_its_toolchain_is_refused(tiny_model, monkeypatch):
    from steer.errors import ConfigError
    from train.compiled import check_compile_support

    model, _ = tiny_model
    monkeypatch.setenv("CXX", "no-such-cxx-compiler")
    with pytest.raises(
        ConfigError, match=r"C\+\+ compiler .*no-such-cxx-compiler.*or train without --compile"
    ):
        Harvester(model, LAYER, compile=True)
    with pytest.raises(ConfigError, match="supports cpu and cuda devices, not 'mps'"):
        check_compile_support("mps")
    assert not resolve_compile(None, "cpu", AUTO_COMPILE_TOKENS), "auto: eager without the toolchain"


def test_resolve_compile_on_a_cpu_from_its_token_budget():
    assert resolve_compile(None, "cpu", AUTO_COMPILE_TOKENS), "this machine has g++ and Python's headers"
    assert not resolve_compile(None, "cpu", AUTO_COMPILE_TOKENS - 1), "short runs: the compile would not pay"
    assert not resolve_compile(None, "cuda", 10**9), "not measured on GPUs: eager there"
    assert resolve_compile(True, "cuda", 1) and not resolve_compile(False, "cpu", 10**9), "a setting is kept"


def test_swapped_forwards_put_back_an_instance_forward():
    from torch import nn

    from train.compiled import swapped_forwards

    wrapped, plain = nn.Linear(2, 2), nn.Linear(2, 2)
    wrapper = wrapped.forward  # an instance attribute, as accelerate's device-map hook sets
    wrapped.forward = wrapper
    with swapped_forwards([wrapped, plain], [torch.neg, torch.abs]):
        inside = [wrapped.forward, plain.forward]
    assert inside == [torch.neg, torch.abs]
    assert wrapped.__dict__["forward"] is wrapper and "forward" not in plain.__dict__
    with swapped_forwards([plain], None):
        assert "forward" not in plain.__dict__

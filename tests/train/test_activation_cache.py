"""Harvested activation caches: what is stored, reading it back through the mixing buffer, exact resume,
and `fast-steer harvest` then `train --activations` resuming after a SIGKILL as if never killed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

from apps.cli import main
from tests.apps.cli.test_train import tiny_setup  # noqa: F401 - the module's fixture
from tests.conftest import build_tiny_model, read_conversations
from tests.train.kill import kill_after_first_checkpoint
from tests.train.streams import stream_run
from train.activation_cache import CachedActivationStream, harvest_summary, write_cache
from train.activations import ActivationStream
from train.data import Corpus
from train.harvest import Harvester
from train.sequences import fast_sequences

SMALL = dict(buffer_tokens=512, token_budget=1024, max_len=256, pool_size=8)


@pytest.fixture
def harvested(chatml_tokenizer, tmp_path):
    """A tiny Llama, its FAST stream over 30 conversations, and that stream harvested into shards."""
    model = build_tiny_model("llama", len(chatml_tokenizer))
    corpus = Corpus(kind="chat", items=read_conversations("gpteacher.jsonl", 30), sources=["gpteacher"])
    stream = ActivationStream(model, chatml_tokenizer, corpus, stream_run(**SMALL))
    manifest = write_cache(stream, tmp_path / "cache", model_source="tiny", shard_tokens=1000, progress=False)
    return model, stream, manifest, tmp_path / "cache"


def test_cache_stores_every_real_token_with_its_ids_sequence_and_position(harvested, chatml_tokenizer):
    model, stream, manifest, folder = harvested
    seqs = fast_sequences(stream.corpus.items, chatml_tokenizer, max_len=256)
    assert manifest["tokens"] == sum(map(len, seqs)) and len(manifest["shards"]) > 2
    shards = [load_file(str(folder / s["file"])) for s in manifest["shards"]]
    cat = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    assert cat["activations"].shape == (manifest["tokens"], 64) and cat["activations"].dtype == torch.float32
    starts = cat["position"] == 0
    assert int(starts.sum()) == len(seqs) == manifest["stats"]["sequences"]
    assert torch.equal(cat["sequence"].unique(), torch.arange(len(seqs)))
    # the harvest order is the stream's batch order; the first batch's residuals match the harvester's
    first = next(stream.epoch_batches(0))
    expected = Harvester(model, 1)(first)
    torch.testing.assert_close(cat["activations"][: len(expected)], expected)
    assert cat["token_ids"][: len(expected)].tolist() == first.input_ids[first.attention_mask.bool()].tolist()
    assert manifest["provenance"]["chat_template_sha256"] and manifest["layer"] == 1
    with pytest.raises(FileExistsError, match="already holds a harvest"):
        write_cache(stream, folder, model_source="tiny", progress=False)


def test_cached_stream_mixes_every_token_once_and_applies_the_first_token_rule(harvested):
    _, _, manifest, folder = harvested
    run = stream_run(**SMALL, max_epochs=1)
    run = replace(run, data=replace(run.data, activations=str(folder)))
    stream = CachedActivationStream(run, chunk_tokens=300)
    batches = list(stream)
    assert all(b.shape == (128, 64) for b in batches)
    assert len(batches) * 128 + stream.stats["dropped_tokens"] == manifest["tokens"]
    skip = CachedActivationStream(replace(run, stream=replace(run.stream, exclude_first_token=True)))
    n = sum(len(b) for b in skip) + skip.stats["dropped_tokens"]
    assert skip.stats["excluded_first"] == manifest["stats"]["sequences"]
    assert n == manifest["tokens"] - manifest["stats"]["sequences"]
    info = skip.provenance()
    assert info["activations"] == str(folder) and info["sequences"] > 0 and info["padding_share"] == 0.0
    with pytest.raises(ValueError, match="layer: cache 1 vs run 2"):
        CachedActivationStream(replace(run, layer=2))


def test_cache_records_its_dtype_and_refuses_another(harvested):
    """The manifest says how the cache was computed; a cache harvested in float32 is not read as bfloat16."""
    _, _, manifest, folder = harvested
    assert manifest["model_dtype"] == "float32" and manifest["device"] == "cpu"
    assert manifest["versions"]["torch"] == torch.__version__
    assert (
        manifest["versions"]["transformers"] == transformers.__version__
        and "fast-steer" in manifest["versions"]
    )
    run = stream_run(**SMALL)
    run = replace(run, data=replace(run.data, activations=str(folder)))
    for accepted in ("auto", "float32", "float"):  # auto takes the cache's own dtype
        assert CachedActivationStream(replace(run, model_dtype=accepted)).d_in == 64
    message = (
        rf"{folder} was harvested with the model in float32, but bfloat16 is requested now: activations of two "
        r"dtypes would mix. Request float32 \(--dtype float32, or auto\)"
    )
    with pytest.raises(ValueError, match=message):
        CachedActivationStream(replace(run, model_dtype="bfloat16"))
    # a cache written before model_dtype was recorded: its provenance names the dtype, and it is checked too
    old = {k: v for k, v in manifest.items() if k not in ("model_dtype", "device", "versions")}
    (folder / "harvest.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="harvested with the model in float32, but bfloat16"):
        CachedActivationStream(replace(run, model_dtype="bfloat16"))
    assert harvest_summary(old) == (
        "model in float32; device not recorded; stored as float32; versions not recorded"
    )


def test_cached_stream_state_round_trip_is_exact(harvested):
    _, _, _, folder = harvested
    run = stream_run(**SMALL)
    run = replace(run, data=replace(run.data, activations=str(folder), seed=3))
    a = CachedActivationStream(run, chunk_tokens=200)
    for _ in range(5):
        next(a)
    b = CachedActivationStream(run, chunk_tokens=200)
    b.load_state_dict(a.state_dict())
    for _ in range(80):  # across an epoch boundary
        assert torch.equal(next(a), next(b))
    assert a.epoch >= 1 and a.stats == b.stats
    other = CachedActivationStream(replace(run, data=replace(run.data, seed=4)), chunk_tokens=200)
    with pytest.raises(ValueError, match="seed: saved 3 vs now 4"):
        other.load_state_dict(a.state_dict())


def _train_from(cache, out, extra=()):
    return ["train", "--activations", str(cache), "--tokens", "6k", "--batch-size", "64", "--buffer-tokens",
            "512", "--arch", "topk", "--k", "4", "--expansion", "2", "--checkpoint-every", "5", "--quiet",
            "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


def test_harvest_then_train_from_the_cache_resumes_exactly_after_sigkill(tiny_setup, tmp_path):  # noqa: F811
    model, data = tiny_setup
    cache = tmp_path / "cache"
    # a whole pass (no --tokens) would compile the tiny model by default: not what this test is about
    res = CliRunner().invoke(main, ["harvest", "--model", str(model), "--data", str(data), "--layer", "1",
                                    "--dtype", "float32", "--token-budget", "1024", "--out", str(cache),
                                    "--shard-tokens", "2k", "--quiet", "--device", "cpu", "--no-compile"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["tokens"] > 2000 and report["shards"] > 1

    killed = tmp_path / "killed"
    step = kill_after_first_checkpoint(_train_from(cache, killed), killed)
    assert 0 < step < 94

    res = CliRunner().invoke(main, _train_from(cache, killed, ["--resume"]))
    assert res.exit_code == 0, res.output
    full = tmp_path / "full"
    res = CliRunner().invoke(main, _train_from(cache, full))
    assert res.exit_code == 0, res.output
    a, b = (load_file(str(d / "sae_weights.safetensors")) for d in (killed, full))
    for name in b:
        assert torch.equal(a[name], b[name]), name
    meta = json.loads((full / "cfg.json").read_text())["metadata"]
    assert meta["activations"] == str(cache) and meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["training_tokens"] == 94 * 64 and meta["model_name"] == str(model)
    assert meta["tokens_yielded"] >= 94 * 64 and meta["sequences"] > 0

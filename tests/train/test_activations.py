"""The activation stream end to end: exact batches, no padding, resume, provenance, 2-process sharding."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tests.conftest import PRETRAIN_DATA, build_tiny_model, read_conversations
from tests.train.streams import stream_run
from train.activations import ActivationStream
from train.data import Corpus, load_texts
from train.harvest import harvest_throughput
from train.sequences import fast_sequences

LAYER = 1
SMALL = dict(
    layer=LAYER, batch_size=128, buffer_tokens=512, token_budget=1024, max_len=256, block_len=128, pool_size=8
)  # flat: `stream_run` maps them onto a RunConfig


def _chat_corpus(n: int = 40) -> Corpus:
    return Corpus(kind="chat", items=read_conversations("gpteacher.jsonl", n), sources=["gpteacher.jsonl"])


@pytest.fixture
def llama(chatml_tokenizer):
    return build_tiny_model("llama", len(chatml_tokenizer)), chatml_tokenizer


def test_exact_batches_and_every_real_token_once(llama):
    model, tok = llama
    corpus = _chat_corpus()
    stream = ActivationStream(model, tok, corpus, stream_run(**SMALL, max_epochs=1))
    out = list(stream)
    assert all(x.shape == (128, 64) and x.dtype == torch.float32 for x in out)
    seqs = fast_sequences(corpus.items, tok, max_len=256)
    total = sum(map(len, seqs))
    s = stream.stats
    assert s["real_tokens"] == s["tokens_harvested"] == total
    assert s["tokens_yielded"] == 128 * len(out) and s["tokens_yielded"] + s["dropped_tokens"] == total
    assert s["dropped_tokens"] < 128 and s["sequences"] == len(corpus)
    assert s["padded_tokens"] > s["real_tokens"]  # batches were padded, and the padding never came out:
    with torch.no_grad():
        ref = torch.cat(
            [model(torch.tensor([q]), output_hidden_states=True).hidden_states[LAYER + 1][0] for q in seqs]
        )
    rows = torch.cat(out)
    nearest = ref[torch.cdist(rows, ref).argmin(dim=1)]
    # each yielded row is the residual of a real token in an unpadded forward
    assert (rows - nearest).norm(dim=-1).max() < 1e-4
    with pytest.raises(StopIteration):
        next(stream)


def _text_corpus() -> Corpus:
    return load_texts(PRETRAIN_DATA / "us_presidential_speeches.jsonl", limit=12)


@pytest.mark.parametrize("method", ["fast", "bt-f", "bt-p"])
def test_state_round_trip_gives_identical_batches(llama, method, tmp_path):
    model, tok = llama
    corpus = _text_corpus() if method == "bt-p" else _chat_corpus()
    cfg = stream_run(**SMALL, method=method, seed=7)
    a = ActivationStream(model, tok, corpus, cfg)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, tmp_path / "stream.safetensors")
    (tmp_path / "stream.json").write_text(json.dumps({k: v for k, v in state.items() if k not in tensors}))

    b = ActivationStream(model, tok, corpus, cfg)
    b.load_state_dict(
        {**json.loads((tmp_path / "stream.json").read_text()), **load_file(tmp_path / "stream.safetensors")}
    )
    n = 12
    if method == "fast":  # continue across an epoch boundary
        n = sum(map(len, fast_sequences(corpus.items, tok, max_len=256))) // 128 + 4
    for _ in range(n):
        assert torch.equal(next(a), next(b))
    assert a.stats == b.stats and a.epoch == b.epoch
    if method == "fast":
        assert a.epoch >= 1
    if method != "fast":
        assert a.stats["padded_tokens"] == a.stats["real_tokens"]  # full blocks, no padding
        assert a.stats["sequences"] * 128 == a.stats["real_tokens"]


def test_a_quota_harvests_only_what_is_taken_and_resumes_exactly(llama):
    model, tok = llama
    cfg = stream_run(**{**SMALL, "buffer_tokens": 1024, "token_budget": 256})
    quota, taken = 7 * 128, 3

    def stream(with_quota: bool) -> ActivationStream:
        s = ActivationStream(model, tok, _chat_corpus(), cfg)
        s.quota = quota if with_quota else None
        return s

    a, open_ended = stream(True), stream(False)
    batches = [next(a) for _ in range(7)]
    for _ in range(7):
        next(open_ended)
    longest = max(max(b.lengths) for b in a.epoch_batches(0))
    assert quota <= a.stats["tokens_harvested"] < quota + longest, (
        "the last fill stops at the row that covers it"
    )
    assert open_ended.stats["tokens_harvested"] >= quota + 1024 // 2, "without it, a refill nobody takes"

    b = stream(True)
    for _ in range(taken):
        next(b)
    resumed = stream(True)
    resumed.load_state_dict(b.state_dict())
    for expected in batches[taken:]:
        assert torch.equal(next(resumed), expected)


def test_provenance_records_what_the_stream_yielded(llama):
    model, tok = llama
    stream = ActivationStream(model, tok, _chat_corpus(), stream_run(**SMALL, exclude_first_token=True))
    before = stream.provenance()
    assert before["sequences"] == 0 and before["padding_share"] == 0.0
    next(stream)
    info = stream.provenance()
    assert info["method"] == "FAST" and info["method_id"] == "fast"
    assert info["chat_template_sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    assert info["special_token_ids"]["<|im_start|>"] == 1 and info["special_token_ids"]["<|im_end|>"] == 2
    assert info["context_size"] == 256 and info["dtype"] == "float32"
    assert info["excluded_first"] == info["sequences"] > 0 and info["data"] == ["gpteacher.jsonl"]
    assert info["tokens_yielded"] == 128 and 0 <= info["padding_share"] < 0.5
    json.dumps(info)
    bt = ActivationStream(model, tok, _chat_corpus(), stream_run(**{**SMALL, "method": "bt-f"})).provenance()
    assert bt["method"] == "BT(F)" and bt["context_size"] == 128


def test_sample_batches_for_benchmarks(llama):
    model, tok = llama
    stream = ActivationStream(model, tok, _chat_corpus(), stream_run(**SMALL))
    batches = stream.sample_batches(2000)
    assert sum(b.n_tokens for b in batches) >= 2000 and all(b.n_padded <= 1024 for b in batches)
    assert [b.input_ids.tolist() for b in stream.sample_batches(2000)] == [
        b.input_ids.tolist() for b in batches
    ]
    assert (stream.epoch, stream.pool, stream.batch_pos, stream.stats["forward_batches"]) == (0, 0, 0, 0)
    report = harvest_throughput(model, batches, LAYER, repeats=1)
    assert report["real_tokens"] == sum(b.n_tokens for b in batches)


def test_bad_configuration_is_rejected(llama):
    model, tok = llama
    corpus = _chat_corpus(4)
    with pytest.raises(ValueError, match="needs a text corpus"):
        ActivationStream(model, tok, corpus, stream_run(layer=1, method="bt-p"))
    with pytest.raises(ValueError, match=r"at least 2 x the batch size"):
        ActivationStream(model, tok, corpus, stream_run(layer=1, batch_size=100, buffer_tokens=150))
    with pytest.raises(ValueError, match="max_len=8192 exceeds the model's 2048 positions"):
        ActivationStream(model, tok, corpus, stream_run(layer=1, max_len=8192))
    assert ActivationStream(model, tok, corpus, stream_run(layer=1)).max_len == 2048  # the model's context
    with pytest.raises(ValueError, match="unknown method 'bt'"):
        ActivationStream(model, tok, corpus, stream_run(layer=1, method="bt"))
    a = ActivationStream(model, tok, corpus, stream_run(**SMALL))
    b = ActivationStream(model, tok, corpus, stream_run(**SMALL, seed=1))
    with pytest.raises(ValueError, match="seed: saved 0 vs now 1"):
        b.load_state_dict(a.state_dict())
    other = Corpus(kind="chat", items=read_conversations("gsm8k_train.jsonl", 4), sources=["gsm8k"])
    with pytest.raises(ValueError, match="corpus_fingerprint"):
        ActivationStream(model, tok, other, stream_run(**SMALL)).load_state_dict(a.state_dict())


def _shard_worker(rank: int, world_size: int, store: str, tok, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size
    )
    try:
        model = build_tiny_model("llama", len(tok))
        stream = ActivationStream(model, tok, _chat_corpus(), stream_run(**SMALL, max_epochs=1))
        n_batches = sum(1 for _ in stream)
        mine = {
            "rank": stream.rank,
            "shard": stream.shard_indices(0),
            "stats": stream.stats,
            "n": n_batches,
        }
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, mine)
        if rank == 0:
            with open(out, "w") as fh:
                json.dump(gathered, fh)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_sharding_is_disjoint(chatml_tokenizer, tmp_path):
    out = tmp_path / "shards.json"
    # fork: the children reuse the imported modules (spawn would re-import transformers, ~10 s each)
    args = (2, str(tmp_path / "store"), chatml_tokenizer, str(out))
    mp.start_processes(_shard_worker, args=args, nprocs=2, join=True, start_method="fork")
    r0, r1 = json.loads(out.read_text())
    assert (r0["rank"], r1["rank"]) == (0, 1)  # taken from torch.distributed
    assert not set(r0["shard"]) & set(r1["shard"])
    assert sorted(r0["shard"] + r1["shard"]) == list(range(40))
    assert [r["stats"]["sequences"] for r in (r0, r1)] == [len(r0["shard"]), len(r1["shard"])]
    total = sum(map(len, fast_sequences(_chat_corpus().items, chatml_tokenizer, max_len=256)))
    assert r0["stats"]["real_tokens"] + r1["stats"]["real_tokens"] == total


@pytest.mark.integration
def test_default_model_norm_exclusion_drops_first_tokens(default_model):
    model, tok = default_model
    corpus = Corpus(
        kind="chat", items=read_conversations("taskmaster4_coffee.jsonl", 12), sources=["taskmaster"]
    )
    cfg = stream_run(
        layer=15, batch_size=64, buffer_tokens=256, token_budget=4096, max_norm_multiple=10.0, max_epochs=1
    )
    stream = ActivationStream(model, tok, corpus, cfg)
    out = torch.cat(list(stream))
    assert stream.stats["excluded_norm"] == stream.stats["sequences"] == 12  # position 0 is ~100x the rest
    assert out.shape[1] == 576 and out.norm(dim=-1).max() < 10 * out.norm(dim=-1).median()


def test_compile_auto_follows_the_budget(llama):
    from dataclasses import replace

    from train.compiled import AUTO_COMPILE_TOKENS, resolve_compile

    model, tok = llama
    run = stream_run()
    assert run.compile is None, "auto by default"
    for tokens in (AUTO_COMPILE_TOKENS - 1, AUTO_COMPILE_TOKENS):
        auto = replace(run, training=replace(run.training, total_tokens=tokens))
        stream = ActivationStream(model, tok, _chat_corpus(), auto)
        assert (stream.harvester.compiled is not None) == resolve_compile(None, "cpu", tokens)
        assert stream.description()["compiled"] == resolve_compile(None, "cpu", tokens)
        forced = ActivationStream(model, tok, _chat_corpus(), replace(auto, compile=False))
        assert forced.harvester.compiled is None and not forced.description()["compiled"]

"""Activation examples on a tiny Llama with a random JumpReLU SAE: collecting, reading, resuming, proxies."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from hub.sae_io import save_sae
from hub.validate import SAEFormatError
from steer.errors import ConfigError, FastSteerError
from steer.sae import SAEConfig, build_sae
from tests.conftest import build_tiny_model, read_conversations
from train.data import DataFormatError
from train.harvest import Harvester
from train.interp import store
from train.interp.collect import CollectConfig, collect_examples
from train.interp.collection import N_DECILES, Collection, CollectionMismatchError, windows_of
from train.interp.proxies import feature_proxies, unembedding
from train.sequences import fast_sequences, make_batch

LAYER = 1
D_SAE = 48
N_UNIQUE, DUPLICATES = 20, 4  # conversations 0..3 appear twice
CONFIG = CollectConfig(
    instances=N_UNIQUE + DUPLICATES, split="all", model="tiny-llama", chunk_conversations=8
)


def random_sae(model, tokenizer, conversations, seed: int):
    """A random JumpReLU SAE whose thresholds make each feature fire on about 4% of the tokens."""
    torch.manual_seed(seed)
    d_in = model.config.hidden_size
    meta = {"hook_name": f"blocks.{LAYER}.hook_resid_post"}
    sae = build_sae(SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=D_SAE, metadata=meta))
    ids = fast_sequences(conversations[:8], tokenizer)
    resid = torch.cat(Harvester(model, LAYER).per_sequence(make_batch(ids, tokenizer.pad_token_id)))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.zero_()
        pre = sae.hidden_pre(resid)
        sae.threshold.copy_(pre.quantile(0.96, dim=0).clamp_min(1e-3))
    return sae


@pytest.fixture(scope="module")
def setup(chatml_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    model = build_tiny_model("llama", len(chatml_tokenizer))
    conversations = read_conversations(n=N_UNIQUE)
    data = root / "chat.jsonl"
    rows = conversations + conversations[:DUPLICATES]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in rows), encoding="utf-8")
    saes = {}
    for name, seed in (("sae", 0), ("other", 1)):
        saes[name] = save_sae(random_sae(model, chatml_tokenizer, conversations, seed), root / name)
    return model, chatml_tokenizer, data, saes, root


def collect(setup, out: Path, config: CollectConfig = CONFIG, **kw) -> Collection:
    model, tokenizer, data, saes, _ = setup
    return collect_examples(
        saes["sae"], data, out, config, model=model, tokenizer=tokenizer, progress=False, **kw
    )


@pytest.fixture(scope="module")
def collection(setup, tmp_path_factory) -> Collection:
    return collect(setup, tmp_path_factory.mktemp("out"))


def live(collection: Collection) -> list[int]:
    features = collection.live_features().tolist()
    assert len(features) > D_SAE // 2
    return features


def test_top_windows_are_distinct_deduplicated_and_sorted(collection):
    duplicated = 0
    for f in live(collection):
        examples = collection.feature(f)
        top = examples.top
        assert top and len(top) <= 20
        maxima = [w.max_activation for w in top]
        assert maxima == sorted(maxima, reverse=True)
        assert maxima[0] == pytest.approx(examples.max_activation)
        assert all(w.activations[w.peak] == w.max_activation for w in top)
        assert len({w.conversation for w in top}) == len(top)
        assert len({w.key for w in top}) == len(top)
        pairs = {w.conversation for w in top} & {N_UNIQUE + i for i in range(DUPLICATES)}
        originals = {w.conversation for w in top} & {i for i in range(DUPLICATES)}
        assert not {c - N_UNIQUE for c in pairs} & originals, "a duplicated conversation shown twice"
        duplicated += len(pairs) + len(originals)
        for w in top:
            assert len(w.tokens) == len(w.token_ids) == len(w.activations) == len(w.special)
            assert w.peak <= 32 and len(w.token_ids) - w.peak - 1 <= 32
    assert duplicated > 0, "no top window came from a duplicated conversation: the check tested nothing"


def test_the_shared_system_prompt_is_shown_once(collection, setup):
    _, tokenizer, data, _, _ = setup
    from train.data import load_conversations

    seqs = fast_sequences(load_conversations(data).items, tokenizer)
    shared = next(i for i in range(min(map(len, seqs))) if len({s[i] for s in seqs}) > 1)
    assert tokenizer.decode(seqs[0][:shared]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    exercised = 0
    for f in live(collection):
        index, _ = collection.entries(f)
        positions = index - collection.offsets[collection.conversation_of[index]]
        if (positions < shared).any():  # fires inside the prefix, so identically in every conversation
            exercised += 1
            top = collection.feature(f).top
            assert sum(w.start + w.peak < shared for w in top) <= 1
    assert exercised > 0


def test_window_tokens_and_special_marks(collection, setup):
    _, tokenizer, data, _, _ = setup
    from steer.positions import resolve_special_tokens
    from train.data import load_conversations

    conversations = load_conversations(data).items
    specials = resolve_special_tokens(tokenizer)
    windows = [w for f in live(collection)[:8] for w in collection.feature(f).top]
    assert any(any(w.special) for w in windows)
    for w in windows:
        ids = fast_sequences([conversations[w.conversation]], tokenizer)[0]
        assert list(w.token_ids) == ids[w.start : w.start + len(w.token_ids)]
        assert list(w.tokens) == [tokenizer.decode([t]) for t in w.token_ids]
        assert (
            list(w.special) == specials.mask(torch.tensor(ids)).tolist()[w.start : w.start + len(w.special)]
        )


def test_decile_windows_fall_in_their_decile(collection):
    sampled = 0
    for f in live(collection):
        examples = collection.feature(f)
        edges = examples.decile_edges
        assert len(edges) == N_DECILES + 1 and edges == sorted(edges)
        for q, windows in enumerate(examples.deciles):
            for w in windows:
                value = w.activations[w.peak]
                assert edges[q] <= value <= edges[q + 1]
                assert w.max_activation == value
            sampled += len(windows)
        everything = list(windows_of(examples))
        assert len({w.key for w in everything}) == len(everything)
        spans = sorted((w.conversation, w.start, w.start + len(w.token_ids)) for w in everything)
        for (c1, _, e1), (c2, s2, _) in zip(spans, spans[1:], strict=False):
            assert c1 != c2 or e1 <= s2, "two windows of one feature overlap"
    assert sampled > 0


def test_decile_sample_is_seeded(setup, collection):
    from train.interp.collection import ExampleConfig

    f = live(collection)[0]
    again = Collection.open(collection.folder, examples=ExampleConfig(seed=0)).feature(f)
    other = Collection.open(collection.folder, examples=ExampleConfig(seed=1)).feature(f)
    assert again == collection.feature(f)
    assert other.top == again.top and other.deciles != again.deciles


def test_negatives_have_zero_activation(collection):
    found = hard_found = 0
    for f in live(collection)[:12]:
        negatives = collection.negatives(f, 5, seed=3)
        assert negatives == collection.negatives(f, 5, seed=3)
        assert all(max(w.activations) == 0 for w in negatives)
        assert len({w.key for w in negatives}) == len(negatives) <= 5
        found += len(negatives)
        top = collection.feature(f).top
        targets = {w.token_ids[w.peak] for w in top}
        hard = collection.hard_negatives(f, 5, seed=3)
        assert all(max(w.activations) == 0 for w in hard)
        assert all(w.token_ids[w.peak] in targets or w.special[w.peak] for w in hard)
        hard_found += len(hard)
    assert found > 0 and hard_found > 0


def test_hard_negatives_take_half_from_the_decoder_neighbour(collection):
    from_neighbour = 0
    features = live(collection)[:12]
    for f, g in zip(features, features[1:], strict=False):
        near_index, _ = collection.entries(g)
        hard = collection.hard_negatives(f, 6, seed=3, neighbour=g)
        assert all(max(w.activations) == 0 for w in hard)
        assert len({w.key for w in hard}) == len(hard) <= 6
        centres = {int(collection.offsets[w.conversation]) + w.start + w.peak for w in hard}
        from_neighbour += len(centres & set(near_index.tolist()))
    assert from_neighbour > 0  # windows centred where the neighbour fires and the feature does not
    with pytest.raises(ConfigError, match="out of range"):
        collection.hard_negatives(features[0], 4, neighbour=collection.d_sae)


def test_density_and_histogram_match_a_direct_computation(setup, collection):
    model, tokenizer, data, saes, _ = setup
    from hub.sae_io import load_sae
    from train.data import load_conversations

    sae = load_sae(saes["sae"])
    conversations = load_conversations(data).items
    harvester = Harvester(model, LAYER)
    fires, counted, peak = torch.zeros(D_SAE), 0, torch.zeros(D_SAE)
    for ids in fast_sequences(conversations, tokenizer):
        resid = harvester.per_sequence(make_batch([ids], tokenizer.pad_token_id))[0][1:]
        with torch.no_grad():
            code = sae.encode(resid)
        fires += (code > 0).sum(0)
        peak = torch.maximum(peak, code.max(0).values)
        counted += len(resid)
    assert collection.tokens_counted == counted
    assert np.abs(collection.count - fires.numpy()).max() <= 2  # batched vs one-by-one forward rounding
    np.testing.assert_allclose(collection.density, fires.numpy() / counted, atol=2 / counted)
    np.testing.assert_allclose(collection.max, peak.numpy(), rtol=2e-3)
    for f in live(collection)[:5]:
        examples = collection.feature(f)
        assert sum(examples.histogram_counts) == examples.count == collection.count[f]
        assert examples.histogram_edges[-1] == pytest.approx(examples.max_activation)
        assert examples.density == pytest.approx(examples.count / counted)


def test_rerun_reuses_the_folder(setup, collection):
    model = setup[0]
    calls = []
    handle = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    manifest = collection.folder / store.MANIFEST
    before = manifest.stat().st_mtime_ns
    try:
        again = collect(setup, collection.folder.parent)
    finally:
        handle.remove()
    assert again.folder == collection.folder and not calls
    assert manifest.stat().st_mtime_ns == before
    assert not (collection.folder / store.CHUNKS).exists()
    other = CollectConfig(**{**CONFIG.keyed(), "max_len": 64})
    assert collect(setup, collection.folder.parent, other).folder != collection.folder


def test_resume_after_interruption_gives_identical_results(setup, collection, tmp_path):
    class Killed(Exception):
        pass

    def kill(index):
        raise Killed

    with pytest.raises(Killed):
        collect(setup, tmp_path, on_chunk=kill)
    folder = next(tmp_path.iterdir())
    assert sorted(p.name for p in (folder / store.CHUNKS).iterdir()) == ["chunk_00000.safetensors"]
    assert not (folder / store.MANIFEST).exists()
    computed = []
    resumed = collect(setup, tmp_path, on_chunk=computed.append)
    assert computed == [1, 2]
    assert resumed.folder.name == collection.folder.name
    for name in (store.TOKENS, store.INDEX):
        ours, reference = load_file(str(resumed.folder / name)), load_file(str(collection.folder / name))
        assert ours.keys() == reference.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], reference[key])
    f = live(collection)[0]
    assert resumed.feature(f) == collection.feature(f)


def test_a_collection_from_another_sae_is_refused(setup, collection):
    saes = setup[3]
    assert Collection.open(collection.folder, sae=saes["sae"]).folder == collection.folder
    with pytest.raises(
        CollectionMismatchError, match=r"collected from the SAE in .*sae.*not from the SAE in .*other"
    ):
        Collection.open(collection.folder, sae=saes["other"])
    assert issubclass(CollectionMismatchError, FastSteerError)


def test_bad_inputs_give_clear_errors(setup, tmp_path):
    model, tokenizer, data, saes, root = setup
    common = dict(model=model, tokenizer=tokenizer, progress=False)
    with pytest.raises(SAEFormatError, match="neither an existing folder"):
        collect_examples(root / "missing" / "sae", data, tmp_path, CONFIG, **common)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(DataFormatError, match="no usable chat records"):
        collect_examples(saes["sae"], empty, tmp_path, CONFIG, **common)
    with pytest.raises(ConfigError, match="split must be one of held-out, all"):
        CollectConfig(split="test")
    with pytest.raises(FastSteerError, match="no finished activation collection"):
        Collection.open(tmp_path)
    assert issubclass(SAEFormatError, FastSteerError) and issubclass(DataFormatError, FastSteerError)
    assert not any(p.is_dir() for p in tmp_path.iterdir()), "a failed collection left a folder"


def test_proxies_for_a_random_sae(setup, collection):
    model, tokenizer, _, saes, _ = setup
    from hub.sae_io import load_sae

    sae = load_sae(saes["sae"])
    features = live(collection)[:6]
    proxies = feature_proxies(collection, sae, features, model=model, tokenizer=tokenizer, k=5)
    w_u = unembedding(model).detach()
    unit = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
    for p, f in zip(proxies, features, strict=True):
        peaks = Counter(w.tokens[w.peak] for w in collection.feature(f).top)
        assert p.top_token == peaks.most_common(1)[0][0]
        assert p.top_token_share == peaks.most_common(1)[0][1] / sum(peaks.values())
        assert 0 <= p.top_token_entropy <= 1 and 0 <= p.special_share <= 1
        assert p.density == pytest.approx(float(collection.density[f]))
        cos = unit[f] @ unit.T
        cos[f] = -2
        assert p.nearest_feature == int(cos.argmax()) != f
        assert p.nearest_cosine == pytest.approx(float(cos.max()), abs=1e-5)
        logits = w_u @ sae.W_dec[f].detach()
        assert p.promoted[0][1] == pytest.approx(float(logits.max()), rel=1e-4)
        assert p.suppressed[0][1] == pytest.approx(float(logits.min()), rel=1e-4)
        assert p.promoted[0][0] == tokenizer.decode([int(logits.argmax())])
        assert len(p.promoted) == len(p.suppressed) == 5


def test_layout_is_safetensors_and_json_only(collection):
    names = sorted(p.name for p in collection.folder.iterdir())
    assert names == sorted([store.MANIFEST, store.TOKENS, store.INDEX, store.VOCAB])
    manifest = json.loads((collection.folder / store.MANIFEST).read_text())
    assert manifest["data"]["conversations"] == N_UNIQUE + DUPLICATES
    assert manifest["settings"]["model"] == "tiny-llama"


def test_the_index_merge_equals_a_direct_sort(tmp_path):
    """`store.build_index` (a two-pass counting sort, one chunk in memory) gives each feature's entries in token
    order, as sorting every (feature, token) pair at once does."""
    from train.interp import store

    rng = np.random.default_rng(0)
    d_sae, bins, entries, start = 30, 5, [], 0
    (tmp_path / store.CHUNKS).mkdir()
    for i in range(3):
        n_tok = int(rng.integers(10, 30))
        nnz = rng.integers(0, 5, size=n_tok)
        features = np.concatenate([rng.choice(d_sae, size=k, replace=False) for k in nnz]).astype(np.int32)
        values = (rng.random(len(features)) * 3).astype(np.float16)
        rows = np.repeat(np.arange(n_tok) + start, nnz)
        entries += list(zip(features.tolist(), rows.tolist(), values.tolist(), strict=True))
        chunk = {"token_ids": rng.integers(0, 50, n_tok).astype(np.int32), "special": rng.random(n_tok) < 0.2,
                 "offsets": np.array([0, n_tok // 2, n_tok]), "indptr": np.concatenate([[0], np.cumsum(nnz)]),
                 "features": features, "values": values}  # fmt: skip
        store.write_atomic(store.chunk_path(tmp_path, i), chunk)
        start += n_tok
    stats = store.build_index(tmp_path, 3, d_sae, bins, skip_first=False)
    index = load_file(str(tmp_path / store.INDEX))
    entries.sort(key=lambda e: (e[0], e[1]))
    assert stats["nonzero"] == len(entries) and stats["tokens"] == start
    assert index["token_index"].tolist() == [e[1] for e in entries]
    assert index["values"].tolist() == [e[2] for e in entries]
    assert (
        np.diff(index["feature_ptr"]).tolist()
        == np.bincount([e[0] for e in entries], minlength=d_sae).tolist()
    )
    assert index["histogram"].sum() == len(entries) and index["histogram"].shape == (d_sae, bins)

"""The token cache: ids read back equal ids tokenised now; any change to what decides them is a new entry."""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import pytest
import torch

from tests.conftest import PRETRAIN_DATA, build_tiny_model, read_conversations
from tests.train.streams import stream_run
from train.activations import ActivationStream
from train.data import Corpus, load_texts
from train.token_cache import TOKEN_CACHE_ENV, TokenCache, default_token_cache, tokenise


@pytest.fixture
def cache(tmp_path) -> TokenCache:
    return TokenCache(tmp_path / "tokens")


@pytest.fixture
def conversations() -> list:
    return read_conversations("gpteacher.jsonl", 12)


def test_a_second_call_reads_back_exactly_what_the_first_tokenised(cache, chatml_tokenizer, conversations):
    texts = [m["content"] for conv in conversations for m in conv][:10]
    for kind, items in (("chat", conversations), ("text", texts)):
        first = cache.token_lists(kind, items, chatml_tokenizer)
        again = cache.token_lists(kind, items, chatml_tokenizer)
        assert first == again == tokenise(kind, items, chatml_tokenizer)
        assert all(isinstance(t, int) for ids in again for t in ids)
    assert (cache.misses, cache.hits) == (2, 2)
    assert len(list(cache.folder.glob("*.npz"))) == 2 and not list(cache.folder.glob("*.tmp"))


def test_a_changed_record_template_or_tokenizer_is_a_new_entry(cache, chatml_tokenizer, conversations):
    cache.token_lists("chat", conversations, chatml_tokenizer)
    edited = copy.deepcopy(conversations)
    edited[3][-1]["content"] += " More."
    cache.token_lists("chat", edited, chatml_tokenizer)
    cache.token_lists("chat", conversations[::-1], chatml_tokenizer)  # the same records in another order
    templated = copy.deepcopy(chatml_tokenizer)
    templated.chat_template = chatml_tokenizer.chat_template.replace("You are a helpful", "You are a terse")
    cache.token_lists("chat", conversations, templated)
    grown = copy.deepcopy(chatml_tokenizer)
    grown.add_tokens(["helpful"])
    ids = cache.token_lists("chat", conversations, grown)
    assert cache.hits == 0 and cache.misses == 5
    assert ids == tokenise("chat", conversations, grown) != tokenise("chat", conversations, chatml_tokenizer)


@pytest.mark.parametrize("damage", ["garbage", "short"])
def test_a_damaged_entry_is_reported_tokenised_afresh_and_replaced(
    cache, chatml_tokenizer, conversations, caplog, damage
):
    expected = cache.token_lists("chat", conversations, chatml_tokenizer)
    (entry,) = cache.folder.glob("*.npz")
    if damage == "garbage":
        entry.write_bytes(b"not an npz")
    else:  # a well-formed file whose lengths do not add up to its ids
        np.savez(entry, ids=np.zeros(3, dtype=np.int32), lengths=np.full(len(conversations), 7))
    with caplog.at_level(logging.WARNING, logger="train.token_cache"):
        assert cache.token_lists("chat", conversations, chatml_tokenizer) == expected
    assert str(entry) in caplog.text and "tokenising afresh" in caplog.text
    assert cache.hits == 0 and cache.token_lists("chat", conversations, chatml_tokenizer) == expected
    assert cache.hits == 1  # the entry was replaced


def test_an_unwritable_folder_costs_only_the_cache(tmp_path, chatml_tokenizer, conversations, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    cache = TokenCache(blocked / "tokens")
    with caplog.at_level(logging.WARNING, logger="train.token_cache"):
        ids = cache.token_lists("chat", conversations, chatml_tokenizer)
    assert ids == tokenise("chat", conversations, chatml_tokenizer)
    assert "could not write the token cache entry" in caplog.text


def test_the_default_cache_lives_in_the_cache_folder_and_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FAST_STEER_CACHE", str(tmp_path))
    monkeypatch.delenv(TOKEN_CACHE_ENV, raising=False)
    assert default_token_cache().folder == tmp_path / "tokens"
    monkeypatch.setenv(TOKEN_CACHE_ENV, "0")
    assert default_token_cache() is None


@pytest.mark.parametrize("method", ["fast", "bt-f", "bt-p"])
def test_a_stream_over_a_corpus_tokenised_before_harvests_the_same_batches(
    tmp_path, monkeypatch, chatml_tokenizer, method
):
    monkeypatch.setenv("FAST_STEER_CACHE", str(tmp_path))
    monkeypatch.delenv(TOKEN_CACHE_ENV, raising=False)
    model = build_tiny_model("llama", len(chatml_tokenizer))
    if method == "bt-p":
        corpus = load_texts(PRETRAIN_DATA, limit=30)
    else:
        corpus = Corpus(
            kind="chat", items=read_conversations("gpteacher.jsonl", 30), sources=["gpteacher.jsonl"]
        )
    run = stream_run(layer=1, batch_size=64, buffer_tokens=256, token_budget=512, max_len=128, block_len=128,
                     pool_size=8, max_epochs=1, method=method)  # fmt: skip
    streams = [ActivationStream(model, chatml_tokenizer, corpus, run) for _ in range(3)]
    streams[2].token_cache = None  # tokenises every pool itself
    out = [torch.cat(list(stream)) for stream in streams]
    assert streams[0].token_cache.misses == 4 and streams[0].token_cache.hits == 0  # 30 records: 4 pools
    assert streams[1].token_cache.hits == 4 and streams[1].token_cache.misses == 0
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_past_its_bound_the_least_recently_used_entries_go(tmp_path, cache, chatml_tokenizer, conversations):
    parts = [conversations[0:4], conversations[4:8], conversations[8:12]]

    def write(target: TokenCache, items: list):
        before = set(target.folder.glob("*.npz"))
        target.token_lists("chat", items, chatml_tokenizer)
        (new,) = set(target.folder.glob("*.npz")) - before
        return new

    a, b = write(cache, parts[0]), write(cache, parts[1])
    os.utime(a, (1, 1))  # a is the older
    os.utime(b, (2, 2))
    cache.token_lists("chat", parts[0], chatml_tokenizer)  # a hit makes a the most recently used
    assert cache.hits == 1 and a.stat().st_mtime > b.stat().st_mtime
    c_size = write(TokenCache(tmp_path / "elsewhere"), parts[2]).stat().st_size
    cache.max_bytes = a.stat().st_size + c_size  # room for a and the new entry, not for b
    c = write(cache, parts[2])
    assert a.is_file() and c.is_file() and not b.exists()
    with pytest.raises(ValueError, match="max_bytes must be non-negative"):
        TokenCache(tmp_path, max_bytes=-1)


def test_a_hit_stands_where_the_entry_cannot_be_marked_used(
    cache, chatml_tokenizer, conversations, monkeypatch
):
    expected = cache.token_lists("chat", conversations, chatml_tokenizer)

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr("train.token_cache.os.utime", read_only)  # a shared cache mounted read-only
    assert cache.token_lists("chat", conversations, chatml_tokenizer) == expected and cache.hits == 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_an_unknown_kind_is_refused_naming_the_kinds(cache, chatml_tokenizer, conversations, use_cache):
    call = cache.token_lists if use_cache else tokenise
    with pytest.raises(ValueError, match="kind must be 'chat' or 'text', got 'tokens'"):
        call("tokens", conversations, chatml_tokenizer)

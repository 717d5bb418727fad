"""FAST sequences, BT blocks and length bucketing on a ChatML tokenizer and the shared chat data."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import read_conversations
from train.sequences import (
    bucket_batches,
    fast_sequences,
    make_batch,
    pack_blocks,
    render_conversation,
    render_conversations,
    text_token_lists,
    token_ids,
)

IM_START = 1


def _conversation_starts(ids, tokenizer) -> int:
    """How many conversations begin in `ids` (each starts with the template's system header)."""
    header = tokenizer("<|im_start|>system\n", add_special_tokens=False)["input_ids"]
    return sum(ids[i : i + len(header)] == header for i in range(len(ids)))


def test_render_matches_apply_chat_template(chatml_tokenizer):
    convs = read_conversations("topical_chat.jsonl", 5)
    for conv, ids in zip(convs, render_conversations(chatml_tokenizer, convs), strict=True):
        expected = chatml_tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert ids == list(expected)
        assert ids[0] == IM_START and ids[1] != IM_START  # no extra BOS added
    assert render_conversation(chatml_tokenizer, convs[0]) == render_conversations(chatml_tokenizer, convs)[0]


@pytest.mark.parametrize("which", ["chatml", "default"])
def test_token_ids_equal_the_tokenizer_call(which, chatml_tokenizer, request):
    """The backend's direct read gives what the tokenizer's own call gives; a backend with truncation or
    special-token splitting switched on goes through that call, which sets them as asked."""
    tok = chatml_tokenizer if which == "chatml" else request.getfixturevalue("default_model").tokenizer
    convs = read_conversations("topical_chat.jsonl", 8)
    texts = tok.apply_chat_template(convs, tokenize=False) + ["<|im_start|> plain text", ""]
    expected = [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert token_ids(tok, texts) == expected
    assert max(map(len, expected)) > 16 and expected[-1] == []
    changed = copy.deepcopy(tok)
    changed.backend_tokenizer.enable_truncation(16)
    assert token_ids(changed, texts) == expected
    changed.split_special_tokens = True
    split = token_ids(changed, texts)
    assert split == [list(ids) for ids in changed(texts, add_special_tokens=False)["input_ids"]]
    assert split[-2] != expected[-2]  # "<|im_start|>" is split into pieces, not read as the special token


def test_fast_keeps_one_conversation_per_sequence(chatml_tokenizer):
    convs = read_conversations("gpteacher.jsonl", 20)
    seqs = fast_sequences(convs, chatml_tokenizer, max_len=100_000)
    assert len(seqs) == len(convs)
    for conv, seq in zip(convs, seqs, strict=True):
        assert _conversation_starts(seq, chatml_tokenizer) == 1
        assert seq == render_conversation(chatml_tokenizer, conv)


def test_fast_truncation(chatml_tokenizer):
    convs = read_conversations("topical_chat.jsonl", 10)
    full = render_conversations(chatml_tokenizer, convs)
    assert max(map(len, full)) > 64
    for f, t in zip(full, fast_sequences(convs, chatml_tokenizer, max_len=64), strict=True):
        assert t == f[:64]
    with pytest.raises(ValueError, match="max_len"):
        fast_sequences(convs, chatml_tokenizer, max_len=0)


def test_bt_blocks_mix_conversations_and_lose_nothing(chatml_tokenizer):
    convs = read_conversations("gsm8k_train.jsonl", 30)
    token_lists = render_conversations(chatml_tokenizer, convs)
    blocks, rest = pack_blocks(token_lists, block_len=256, carry=[7, 8])
    assert all(len(b) == 256 for b in blocks) and len(rest) < 256
    assert sum(blocks, []) + rest == [7, 8] + sum(token_lists, [])
    assert any(_conversation_starts(b, chatml_tokenizer) >= 2 for b in blocks)


def test_text_tokens_end_with_eos(chatml_tokenizer):
    lists = text_token_lists(["To be, or not to be", "that is the question"], chatml_tokenizer)
    assert [t[-1] for t in lists] == [chatml_tokenizer.eos_token_id] * 2
    assert chatml_tokenizer.decode(lists[0][:-1]) == "To be, or not to be"


def test_make_batch_right_pads_with_mask():
    batch = make_batch([[5, 6, 7], [8]], pad_id=2)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert (batch.n_tokens, batch.n_padded) == (4, 6)
    with pytest.raises(ValueError, match="no empty sequences"):
        make_batch([[1], []], pad_id=2)


def test_width_multiple_rounds_batch_widths_and_keeps_the_budget(chatml_tokenizer):
    batch = make_batch([[5, 6, 7], [8]], pad_id=2, width_multiple=4)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2], [8, 2, 2, 2]] and batch.n_tokens == 4
    with pytest.raises(ValueError, match="width_multiple must be positive, got 0"):
        make_batch([[1]], pad_id=2, width_multiple=0)
    with pytest.raises(ValueError, match="width_multiple must be positive, got 0"):
        bucket_batches([[1, 2], [3]], 1024, pad_id=2, width_multiple=0)
    seqs = fast_sequences(read_conversations("synthetic_persona_chat.jsonl", 60), chatml_tokenizer, 2048)
    plain, rounded = (bucket_batches(seqs, 1024, pad_id=2, width_multiple=m) for m in (1, 16))
    assert sorted(i for b in rounded for i in b.indices) == list(range(len(seqs)))
    for b in rounded:
        width = b.input_ids.shape[1]
        assert width % 16 == 0 and width - 16 < max(b.lengths) <= width
        assert b.n_padded <= 1024 or len(b.lengths) == 1
        for row, i in enumerate(b.indices):
            assert b.input_ids[row, : b.lengths[row]].tolist() == seqs[i]
    shapes = {tuple(b.input_ids.shape) for b in rounded}
    assert len(shapes) < len({tuple(b.input_ids.shape) for b in plain}), "fewer distinct shapes"


def test_bucketing_respects_budget_and_covers_every_sequence(chatml_tokenizer):
    seqs = fast_sequences(read_conversations("synthetic_persona_chat.jsonl", 60), chatml_tokenizer, 2048)
    budget = 4096
    batches = bucket_batches(seqs, budget, pad_id=2, seed=0)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(seqs)))
    for b in batches:
        assert b.n_padded <= budget or len(b.lengths) == 1
        for row, i in enumerate(b.indices):
            assert b.input_ids[row, : b.lengths[row]].tolist() == seqs[i]
            assert b.attention_mask[row].sum() == len(seqs[i])
    bucketed_pad = sum(b.n_padded for b in batches) - sum(map(len, seqs))
    # the same batch sizes in corpus order pad far more than length-sorted batches
    sizes = [len(b.lengths) for b in batches]
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    naive_pad = sum(
        len(seqs[s : s + n]) * max(map(len, seqs[s : s + n])) - sum(map(len, seqs[s : s + n]))
        for s, n in zip(starts, sizes, strict=False)
    )
    assert bucketed_pad < naive_pad / 2
    again = bucket_batches(seqs, budget, pad_id=2, seed=0)
    assert [b.indices for b in again] == [b.indices for b in batches]
    assert [b.indices for b in bucket_batches(seqs, budget, 2, seed=1)] != [b.indices for b in batches]

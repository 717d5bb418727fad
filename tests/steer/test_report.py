"""What a `steer()` block reports it edited: positions per spec, per row, under forward and generate."""

from __future__ import annotations

import pytest
import torch

from steer import Edit, Intervention, SteeredModel
from tests.steer.helpers import chat_ids, pad_batch, random_sae

PROMPTS = ["What is the capital of France?", "Say hi"]


@pytest.fixture(scope="module")
def steered(chatml_tokenizer):
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama", len(chatml_tokenizer))
    sae = random_sae(model.config.hidden_size)
    return SteeredModel(model, chatml_tokenizer), sae


def _spec(sae, positions="special", layer=1) -> Intervention:
    return Intervention(layer=layer, sae=sae, edits=[Edit(0, "add", 5.0)], positions=positions)


def test_special_counts_the_chat_templates_special_positions(steered):
    sm, sae = steered
    tok = sm.tokenizer
    ids, mask = pad_batch(chat_ids(tok, PROMPTS), tok.pad_token_id)
    expected = int(sm.special_tokens.mask(ids, mask).sum())
    with torch.no_grad(), sm.steer(_spec(sae), _spec(sae, "all", layer=0)) as report:
        sm(input_ids=ids, attention_mask=mask)
    assert expected > 0
    assert report.per_spec == [expected, int(mask.sum())], "special positions, and every real (unpadded) one"
    assert report.positions == expected + int(mask.sum())
    with pytest.raises(ValueError, match="rows="):
        report.row(0)


def test_plain_text_has_no_special_positions(steered):
    sm, sae = steered
    ids = sm.tokenizer(["What is the capital of France?"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), sm.steer(_spec(sae)) as report:
        sm(input_ids=ids)
    assert report.per_spec == [0] and report.positions == 0
    with torch.no_grad(), sm.steer(_spec(sae, "prompt")) as report:
        sm(input_ids=ids)
    assert report.positions == ids.shape[1]


def test_per_row_counts_with_nested_row_blocks(steered):
    """Two blocks on one batch, each on its own row: each counts only its row; a cached generate counts
    each fed-back token once."""
    sm, sae = steered
    tok = sm.tokenizer
    seqs = chat_ids(tok, PROMPTS)
    ids, mask = pad_batch(seqs, tok.pad_token_id)
    specials = sm.special_tokens.mask(ids, mask).sum(dim=1).tolist()
    n_new = 5
    with (
        torch.no_grad(),
        sm.steer(_spec(sae), rows=[0]) as first,
        sm.steer(_spec(sae, "generated"), rows=[1]) as second,
    ):
        sm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    assert first.row(0) >= specials[0] > 0 and first.row(1) == 0
    assert first.positions == first.row(0)
    # the prompt has no generated position; each of the n_new - 1 tokens fed back counts once
    assert second.row(1) == n_new - 1 and second.row(0) == 0 and second.per_spec == [n_new - 1]


def test_empty_block_reports_nothing(steered):
    sm, _ = steered
    with sm.steer(None) as report:
        pass
    assert report.positions == 0 and report.per_spec == []

"""App. F's anchor on every chat-template family: `top_anchor_feature` picks the top feature of the family's
turn-opening token (not ChatML's `<|im_start|>`), and `special_residual_norm` measures the family's special
positions, on conversations that open with a system message (Gemma 2's folded)."""

from __future__ import annotations

import math

import pytest

from tests.chat_families import NAMES, family_model, family_tokenizer
from tests.conftest import read_conversations
from tests.steer.helpers import random_sae
from tests.steer.test_chat_template import OPENERS
from train.features import discover_features, special_residual_norm, top_anchor_feature

LAYER = 1
DATA = "synthetic_persona_chat.jsonl"  # every conversation opens with a system message


@pytest.mark.parametrize("name", NAMES)
def test_anchor_feature_is_the_top_feature_of_the_turn_opening_token(name):
    tok, model = family_tokenizer(name), family_model(name)
    conversations = read_conversations(DATA, 6)
    sae = random_sae(model.config.hidden_size, 64)
    feature, activation = top_anchor_feature(model, tok, sae, LAYER, conversations, progress=False)
    report = discover_features(model, tok, sae, LAYER, conversations, top_k=5, progress=False)
    top = report.top(OPENERS[name])[0]
    assert (feature, activation) == (top.feature, pytest.approx(top.mean_max_activation))
    assert activation > 0
    norm = special_residual_norm(model, tok, LAYER, conversations)
    assert math.isfinite(norm) and norm > 0

"""`steer.chat_template`: the messages a template accepts (Gemma 2's system message folded, through
`SteeredModel.chat` too) and the turn-opening anchor token of every chat-template family."""

from __future__ import annotations

import copy

import pytest
from jinja2 import TemplateError

from steer import SteeredModel
from steer.chat_template import fold_system, template_messages, turn_opening_token
from steer.errors import ConfigError
from tests.chat_families import FAMILIES, NAMES, family_model, family_tokenizer

SYSTEM_PROMPT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]
# The token that opens a user turn, per family (what App. F's `<|im_start|>` is in each).
OPENERS = {
    "llama3": "<|start_header_id|>",
    "qwen2.5": "<|im_start|>",
    "qwen3": "<|im_start|>",
    "gemma2": "<start_of_turn>",
    "gemma3": "<start_of_turn>",
    "mistral": "[INST]",
    "phi3": "<|user|>",
    "phi4-mini": "<|user|>",
}


@pytest.mark.parametrize("name", NAMES)
def test_turn_opening_token_of_each_family(name):
    assert turn_opening_token(family_tokenizer(name)) == OPENERS[name]


def test_turn_opening_token_of_chatml(chatml_tokenizer):
    assert turn_opening_token(chatml_tokenizer) == "<|im_start|>"


def test_a_template_that_opens_turns_with_no_special_token_is_refused(chatml_tokenizer):
    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ConfigError, match=r"opens a user turn with no special token.*--feature K"):
        turn_opening_token(tok)


@pytest.mark.parametrize("name", NAMES)
def test_template_messages_fold_the_system_message_only_where_the_template_refuses_it(name):
    tok = family_tokenizer(name)
    folded = template_messages(tok, SYSTEM_PROMPT)
    if FAMILIES[name].system == "raises":
        assert folded == [{"role": "user", "content": "You are terse.\n\nName a colour."}]
        assert folded == fold_system(SYSTEM_PROMPT)
    else:
        assert folded == SYSTEM_PROMPT
    assert template_messages(tok, SYSTEM_PROMPT[1:]) == SYSTEM_PROMPT[1:]


def test_steered_model_chat_with_a_system_message_on_gemma2():
    """Gemma 2's template raises on a system message; `chat` folds it and replies as to the folded turn."""
    tok = family_tokenizer("gemma2")
    with pytest.raises(TemplateError, match="System role not supported"):
        tok.apply_chat_template(SYSTEM_PROMPT, tokenize=False)
    sm = SteeredModel(family_model("gemma2"), tok)
    assert sm.chat(SYSTEM_PROMPT, max_new_tokens=8) == sm.chat(fold_system(SYSTEM_PROMPT), max_new_tokens=8)

"""The server says how many positions a request's spec edited: `usage.steered_positions`, and `/health`."""

from __future__ import annotations

import pytest

from tests.apps.serve.helpers import MODEL, STRONG, chat, client, health, serving, tiny_parts

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def tiny(chatml_tokenizer, tmp_path_factory):
    return tiny_parts(chatml_tokenizer, tmp_path_factory.mktemp("serve_positions"))


@pytest.fixture(scope="module")
def server(tiny):
    with serving(*tiny, max_new_tokens=32, max_prompt_tokens=256) as srv:
        yield srv


@pytest.fixture(scope="module")
def cl(server):
    return client(server)


def _steered(out) -> int | None:
    return (out.usage.model_extra or {}).get("steered_positions")


def test_usage_counts_the_edited_positions(tiny, server, cl):
    _, tok, _ = tiny
    before = health(server)["steered_positions"]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert _steered(chat(cl, PROMPT)) is None, "a plain request has no count"
    special = chat(cl, PROMPT, steering=STRONG)  # `special` positions: the chat template's
    assert _steered(special) > 0
    # `all`: the prompt, and each generated token fed back (the last one is never fed)
    every = chat(cl, PROMPT, steering={**STRONG, "positions": "all"}, max_tokens=6)
    assert every.choices[0].finish_reason == "length"
    assert _steered(every) == len(prompt) + 5
    both = chat(cl, PROMPT, steering={**STRONG, "positions": "all"}, max_tokens=6, compare=True)
    assert _steered(both) == len(prompt) + 5, "compare: the steered row's count"
    streamed = list(chat(cl, PROMPT, steering=STRONG, stream=True, stream_options={"include_usage": True}))
    assert _steered(streamed[-1]) == _steered(special)
    counted = sum(map(_steered, (special, every, both, streamed[-1])))
    assert health(server)["steered_positions"] == before + counted


def test_special_spec_on_plain_text_says_zero(cl):
    """A text completion has no chat template, so a `special` spec edits nothing, and the response says so."""
    out = cl.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=4,
        temperature=0,
        extra_body={"steering": STRONG},
    )
    assert _steered(out) == 0

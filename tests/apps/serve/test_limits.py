"""The server's caps over real HTTP: each over-limit request is an OpenAI-shaped 400 naming the limit, the
value sent and the flag; prompt + max_tokens over the model's context names both numbers; the compiled-spec
cache is bounded by bytes."""

from __future__ import annotations

import httpx
import pytest

from apps.serve.engine import context_length
from apps.serve.schemas import Limits
from tests.apps.serve.helpers import MODEL, STRONG, serving, tiny_parts

LIMITS = dict(max_specs_per_request=2, max_stop_chars=10, max_prompts=2, max_messages=3,
              max_prompt_tokens=4096, max_new_tokens=1024, max_compiled_bytes=600)  # fmt: skip
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TEXT = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
MANY_EDITS = {**STRONG, "edits": [{"feature": i % 32, "op": "add", "strength": 1.0} for i in range(10_000)]}


@pytest.fixture(scope="module")
def tiny(chatml_tokenizer, tmp_path_factory):
    return tiny_parts(chatml_tokenizer, tmp_path_factory.mktemp("serve_limits"))


@pytest.fixture(scope="module")
def server(tiny):
    with serving(*tiny, **LIMITS) as srv:
        yield srv


def _error(server, path: str, body: dict) -> tuple[int, dict]:
    response = httpx.post(server.url + path, json=body, timeout=60)
    return response.status_code, response.json()["error"]


# case -> (path, body, param, words the message must hold: the value sent, the limit, the flag)
OVER = {
    "10,000 edits": ("/chat/completions", {**CHAT, "steering": MANY_EDITS}, "steering.edits",
                     ["10000", f"{Limits().max_edits_per_spec}", "--max-edits-per-spec"]),
    "edits in a list": ("/chat/completions", {**CHAT, "steering": [STRONG, MANY_EDITS]}, "steering[1].edits",
                        ["10000", "--max-edits-per-spec"]),
    "specs per request": ("/chat/completions", {**CHAT, "steering": [STRONG] * 3}, "steering",
                          ["is 3", "at most 2", "--max-specs-per-request"]),
    "stop length": ("/chat/completions", {**CHAT, "stop": ["ok", "x" * 11]}, "stop",
                    ["stop[1]", "is 11", "at most 10", "--max-stop-chars"]),
    "prompts": ("/completions", {**TEXT, "prompt": ["a", "b", "c"]}, "prompt", ["is 3", "at most 2", "--max-prompts"]),
    "messages": ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi"}] * 4}, "messages",
                 ["is 4", "at most 3", "--max-messages"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OVER))
def test_over_a_limit_is_a_400_naming_limit_and_value(server, case):
    path, body, param, words = OVER[case]
    status, error = _error(server, path, body)
    assert status == 400 and error["param"] == param and error["code"] == "limit_exceeded", error
    assert error["type"] == "invalid_request_error"
    assert all(word in error["message"] for word in words), error["message"]


def test_prompt_plus_max_tokens_over_the_context(tiny, server):
    model, tok, _ = tiny
    context = context_length(model, tok)
    assert context == model.config.max_position_embeddings == 2048
    prompt = "word " * 700
    n_prompt = len(tok(prompt)["input_ids"])
    assert n_prompt < context < n_prompt + 1000
    status, error = _error(server, "/completions", {**TEXT, "prompt": prompt, "max_tokens": 1000})
    assert status == 400 and error["param"] == "max_tokens", error
    assert f"({n_prompt} tokens)" in error["message"] and "max_tokens (1000)" in error["message"]
    assert f"context is {context}" in error["message"]
    chat = {**CHAT, "messages": [{"role": "user", "content": prompt}], "max_completion_tokens": 1000}
    status, error = _error(server, "/chat/completions", chat)
    assert status == 400 and error["param"] == "max_completion_tokens" and f"{context}" in error["message"]


def test_compiled_specs_are_bounded_by_bytes(server):
    steering = server.service.steering
    add = [{**STRONG, "edits": [{"feature": 3, "op": "add", "strength": float(s)}]} for s in range(1, 6)]
    for spec in add:  # 64 float32 values each: 256 bytes, so two fit in 600
        steering.parse(spec)
    assert steering.cached_bytes == 512
    steering.parse(
        {**STRONG, "edits": [{"feature": 3, "op": "scale", "strength": 2.0}]}
    )  # 768 bytes: not kept
    assert steering.cached_bytes == 512
    health = httpx.get(server.url.removesuffix("/v1") + "/health").json()
    assert health["compiled_spec_bytes"] == 512

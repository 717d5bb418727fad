"""`fast-steer serve` over real HTTP with the official `openai` client, on a tiny Llama and a random SAE:
plain, steered, compare, streaming, logprobs, text completions, the default spec, and every bad request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.apps.serve.helpers import (
    MODEL,
    OTHER,
    STRONG,
    chat,
    client,
    health,
    hf_greedy,
    serving,
    tiny_parts,
)

PROMPT = "What is the capital of France?"
ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def tiny(chatml_tokenizer, tmp_path_factory):
    return tiny_parts(chatml_tokenizer, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(tiny):
    with serving(*tiny, max_new_tokens=64, max_prompt_tokens=256, admin_key="admin-secret") as srv:
        yield srv


@pytest.fixture(scope="module")
def cl(server):
    return client(server)


def test_plain_is_the_models_greedy_reply(tiny, server, cl):
    model, tok, _ = tiny
    out = chat(cl, PROMPT, max_tokens=10)
    assert out.choices[0].message.content == hf_greedy(model, tok, PROMPT, 10)
    template = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=True
    )
    prompt_len = len(template["input_ids"])
    assert out.usage.prompt_tokens == prompt_len
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"
    assert out.model == MODEL and [m.id for m in cl.models.list()] == [MODEL]
    assert health(server)["status"] == "ok"


def test_steered_differs_null_is_plain(cl):
    plain = chat(cl, PROMPT).choices[0].message.content
    steered = chat(cl, PROMPT, steering=STRONG)
    assert steered.choices[0].message.content != plain
    assert steered.model_extra["steering"][0]["sae"] == "tiny"
    assert chat(cl, PROMPT, steering=None).choices[0].message.content == plain
    assert chat(cl, PROMPT, steering=[STRONG, OTHER]).choices[0].message.content not in (plain,)


def test_compare_labels_and_same_seed(cl):
    out = chat(cl, PROMPT, steering=STRONG, compare=True, temperature=1.0, seed=7)
    labels = [c.model_extra["label"] for c in out.choices]
    assert labels == ["steered", "plain"] and [c.index for c in out.choices] == [0, 1]
    steered, plain = (c.message.content for c in out.choices)
    assert steered != plain
    assert chat(cl, PROMPT, temperature=1.0, seed=7).choices[0].message.content == plain
    assert chat(cl, PROMPT, steering=STRONG, temperature=1.0, seed=7).choices[0].message.content == steered
    assert chat(cl, PROMPT, temperature=1.0, seed=8).choices[0].message.content != plain
    assert out.usage.completion_tokens == 24
    no_op = {**STRONG, "edits": []}  # steered = plain, so the two choices agree exactly when seeds do
    unseeded = chat(cl, PROMPT, steering=no_op, compare=True, temperature=1.0, max_tokens=20).choices
    assert unseeded[0].message.content == unseeded[1].message.content
    again = chat(cl, PROMPT, steering=no_op, compare=True, temperature=1.0, max_tokens=20).choices
    assert again[0].message.content != unseeded[0].message.content, "no seed: a fresh one per request"


def test_stream_equals_whole_reply(cl):
    whole = chat(cl, PROMPT, steering=STRONG, max_tokens=20)
    chunks = list(chat(cl, PROMPT, steering=STRONG, max_tokens=20, stream=True,
                       stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    both = chat(cl, PROMPT, steering=STRONG, compare=True, max_tokens=20)
    streamed = list(
        chat(cl, PROMPT, steering=STRONG, compare=True, max_tokens=20, stream=True, logprobs=True)
    )
    for choice in both.choices:
        mine = [c.choices[0] for c in streamed if c.choices[0].index == choice.index]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert (
            "".join(e.token for c in mine if c.logprobs for e in c.logprobs.content) == choice.message.content
        )


def test_logprobs(cl):
    out = chat(cl, PROMPT, logprobs=True, top_logprobs=3, max_tokens=8)
    choice = out.choices[0]
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content and len(entries) == 8
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
    assert chat(cl, PROMPT).choices[0].logprobs is None


def test_stop_string_cuts_the_reply(cl):
    plain = chat(cl, PROMPT, max_tokens=20).choices[0].message.content
    stop = plain[5:8]
    out = chat(cl, PROMPT, max_tokens=20, stop=[stop, "never-seen"])
    assert out.choices[0].message.content == plain[: plain.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = chat(cl, PROMPT, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain[: plain.index(stop)]


def test_text_completions(cl):
    out = cl.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                logprobs=2)  # fmt: skip
    choice = out.choices[0]
    assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.top_logprobs[0]) == 2
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and all(
        choice.text[o:].startswith(t) for o, t in zip(offsets, choice.logprobs.tokens, strict=True)
    )
    steered = cl.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                    temperature=0, extra_body={"steering": {**STRONG, "positions": "all"}})  # fmt: skip
    assert steered.choices[0].text != choice.text


def test_default_spec_get_put(server, cl):
    base = server.url
    plain = chat(cl, PROMPT).choices[0].message.content
    steered = chat(cl, PROMPT, steering=STRONG).choices[0].message.content
    assert httpx.get(f"{base}/steering").json() == {"steering": None}
    try:
        put = httpx.put(f"{base}/steering", json={"steering": STRONG}, headers=ADMIN).json()
        assert put["steering"][0]["edits"] == STRONG["edits"]
        assert chat(cl, PROMPT).choices[0].message.content == steered
        assert chat(cl, PROMPT, steering=None).choices[0].message.content == plain
    finally:
        httpx.put(f"{base}/steering", json={"steering": None}, headers=ADMIN)
    assert chat(cl, PROMPT).choices[0].message.content == plain


def test_saes_endpoint(server):
    (sae,) = httpx.get(f"{server.url}/saes").json()["data"]
    assert (sae["id"], sae["layer"], sae["d_in"], sae["d_sae"]) == ("tiny", 1, 64, 32)
    assert sae["top_features"] is None


def _post(server, body, path="/chat/completions") -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"})


BASE = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
BAD_REQUESTS = {
    "unknown SAE name": ({"steering": {**STRONG, "sae": "nope"}}, "steering.sae", "must name an SAE"),
    "a path as SAE": ({"steering": {**STRONG, "sae": "/etc"}}, "steering.sae", "never reads SAE paths"),
    "feature out of range": (
        {"steering": [OTHER, {**STRONG, "edits": [{"feature": 32, "strength": 1.0}]}]},
        "steering[1]",
        "out of range for an SAE with d_sae=32",
    ),
    "unknown op": ({"steering": {**STRONG, "edits": [{"feature": 1, "op": "boost"}]}}, "steering", "unknown edit op"),
    "layer mismatch": ({"steering": {**STRONG, "layer": 2}}, "steering", "trained on layer 1"),
    "max tokens over limit": ({"max_tokens": 65}, "max_tokens", "more than this server allows (64"),
    "prompt over limit": (
        {"messages": [{"role": "user", "content": "word " * 400}]}, "messages", "at most 256",
    ),
    "unknown parameter": ({"echo": True}, "echo", "unsupported parameter"),
    "bad temperature": ({"temperature": 3}, "temperature", "less than or equal to 2"),
    "compare without spec": ({"compare": True}, "compare", "needs a steering spec"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "Input should be"),
    "steering not a spec": ({"steering": 5}, "steering", "valid dictionary, or Input should be a valid list"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request(server, cl, case):
    change, param, message = BAD_REQUESTS[case]
    extra = {k: change[k] for k in ("steering", "compare", "echo") if k in change}
    direct = {k: v for k, v in change.items() if k not in extra}
    with pytest.raises(openai.BadRequestError) as caught:
        cl.chat.completions.create(**{**BASE, **direct}, extra_body=extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and param == error["param"] and message in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_malformed_unknown_oversize(server):
    bad_json = _post(server, '{"model": "tiny", "messages": [')
    assert bad_json.status_code == 400 and "malformed JSON" in bad_json.json()["error"]["message"]
    not_object = _post(server, "[1, 2]")
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    huge = _post(server, {**BASE, "user": "x" * 1_100_000})
    assert huge.status_code == 413 and "larger than this server accepts" in huge.json()["error"]["message"]
    chunked = httpx.post(server.url + "/chat/completions", content=iter([b"{" + b" " * 600_000] * 2))
    assert (
        chunked.status_code == 413 and "larger than this server accepts" in chunked.json()["error"]["message"]
    )
    wrong_model = _post(server, {**BASE, "model": "gpt-4"})
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    put = httpx.put(f"{server.url}/steering", json={"steering": {**STRONG, "sae": "x"}}, headers=ADMIN)
    assert put.status_code == 400 and put.json()["error"]["param"] == "steering.sae"
    missing = _post(server, {"model": MODEL})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    assert httpx.get(server.url + "/nothing").json()["error"]["type"] == "not_found_error"

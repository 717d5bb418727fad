"""Faults over real HTTP, made by the engine's `fault` hook: a row that raises fails alone (its batch-mates'
replies equal their solo replies, the client gets an error id and no exception text), a dead engine thread
(503 from /health and from requests, then a new worker), and the request deadline (504, or an error event
in a stream)."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from apps.serve.rows import Row
from tests.apps.serve.helpers import MODEL, health, hf_greedy, serving, tiny_parts, wait_for

PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hi"]
SECRET = "the secret text of a bug"
FAULTY, KILLER, SLOW = 666, 13, 21  # the seeds that the tests' fault hooks react to


class Killed(BaseException):
    """What kills the engine's worker thread (no `except Exception` catches it)."""


def _body(text: str, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0,
            **fields}  # fmt: skip


def _post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def tiny(chatml_tokenizer, tmp_path_factory):
    return tiny_parts(chatml_tokenizer, tmp_path_factory.mktemp("serve_faults"))


def test_a_faulting_row_fails_alone(tiny):
    model, tok, sae_dir = tiny

    def fault(row: Row) -> None:
        if row.params.seed == FAULTY:
            raise RuntimeError(SECRET)

    # three rows fill the batch, so the three requests are batched together whatever their timing
    with serving(model, tok, sae_dir, max_batch=3, window=60.0, fault=fault) as server:
        bodies = [_body(PROMPTS[0]), _body(PROMPTS[1]), _body(PROMPTS[2], seed=FAULTY)]
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda b: _post(server, b), bodies))
        stats = health(server)
    assert stats["largest_batch"] == 3 and stats["batches"] == 1 and stats["failed_rows"] == 1
    for reply, text in zip(replies[:2], PROMPTS, strict=False):
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == hf_greedy(model, tok, text, 8)
    failed = replies[2]
    error = failed.json()["error"]
    assert failed.status_code == 500 and error["type"] == "server_error" and error["code"] == "internal_error"
    assert re.fullmatch(r"internal error, id [0-9a-f]{32} \(see the server log\)", error["message"])
    assert SECRET not in failed.text and "RuntimeError" not in failed.text


def test_a_batch_that_fails_as_a_whole_reruns_its_rows_alone(tiny):
    """A forward that fails for the whole batch (here: a real pre-hook on layer 0 that refuses the first batch
    of several rows) costs nothing: each row that had sent nothing runs again alone and gets its solo reply."""
    model, tok, sae_dir = tiny
    refused = []

    def refuse_first_batch(module, args):
        hidden = args[0]
        if hidden.shape[0] > 1 and not refused:
            refused.append(hidden.shape[0])
            raise RuntimeError(SECRET)

    handle = model.model.layers[0].register_forward_pre_hook(refuse_first_batch)
    try:
        with serving(model, tok, sae_dir, max_batch=3, window=60.0) as server:
            with ThreadPoolExecutor(3) as pool:
                replies = list(pool.map(lambda text: _post(server, _body(text)), PROMPTS))
            stats = health(server)
    finally:
        handle.remove()
    assert refused == [3] and stats["batches"] == 1 and stats["failed_rows"] == 0
    for reply, text in zip(replies, PROMPTS, strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == hf_greedy(model, tok, text, 8)


def _killer(row: Row) -> None:
    if row.params.seed == KILLER:
        raise Killed


def test_engine_death_answers_503_while_down(tiny):
    """While the dead worker waits to be replaced (an hour here, so nothing races the checks), the request that
    killed it, later requests and /health all answer 503."""
    model, tok, sae_dir = tiny
    with serving(model, tok, sae_dir, fault=_killer, restart_delay=3600.0) as server:
        base = server.url.removesuffix("/v1")
        killed = _post(server, _body(PROMPTS[0], seed=KILLER))
        assert killed.status_code == 503 and "engine thread died (Killed" in killed.json()["error"]["message"]
        down = httpx.get(base + "/health")
        refused = _post(server, _body(PROMPTS[1]))
        assert down.status_code == 503 and down.json()["status"] == "unavailable"
        assert "engine thread died" in down.json()["reason"]
        error = refused.json()["error"]
        assert refused.status_code == 503 and error["code"] == "engine_unavailable", refused.text
        assert health(server)["restarts"] == 1


def test_a_dead_engine_restarts_and_serves_again(tiny):
    model, tok, sae_dir = tiny
    with serving(model, tok, sae_dir, fault=_killer, restart_delay=0.0) as server:
        base = server.url.removesuffix("/v1")
        killed = _post(server, _body(PROMPTS[0], seed=KILLER))
        assert killed.status_code == 503
        wait_for(lambda: httpx.get(base + "/health").status_code == 200, "the engine's restart")
        again = _post(server, _body(PROMPTS[1]))
        assert again.status_code == 200
        assert again.json()["choices"][0]["message"]["content"] == hf_greedy(model, tok, PROMPTS[1], 8)
        assert health(server)["restarts"] == 1


def test_request_timeout_504_and_stream_error(tiny):
    model, tok, sae_dir = tiny
    release = threading.Event()

    def fault(row: Row) -> None:
        if row.params.seed == SLOW:
            release.wait()  # the engine is stuck on this row until the test lets it go

    try:
        with serving(model, tok, sae_dir, fault=fault, request_timeout=1.0) as server:
            late = _post(server, _body(PROMPTS[0], seed=SLOW))
            error = late.json()["error"]
            assert late.status_code == 504 and error["code"] == "request_timeout", late.text
            assert "1 s, --request-timeout" in error["message"]
            with httpx.stream("POST", server.url + "/chat/completions", json=_body(PROMPTS[1], stream=True),
                              timeout=120) as stream:  # fmt: skip
                assert stream.status_code == 200
                events = [line.removeprefix("data: ") for line in stream.iter_lines() if line]
            assert json.loads(events[-1])["error"]["code"] == "request_timeout"
            release.set()
            wait_for(lambda: health(server)["cancelled_rows"] == 2, "both rows to be cancelled")
            assert health(server)["queued"] == 0
    finally:
        release.set()

"""The serving engine under concurrency, over real HTTP: mixed-spec batches equal each request alone, a full
queue answers 429 at once, API keys, and clients that disconnect mid-stream (cancelled, nothing kept)."""

from __future__ import annotations

import gc
import json
import socket
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from apps.serve.auth import check_bind, is_loopback
from apps.serve.rows import Row, RowDecoder
from tests.apps.serve.helpers import OTHER, STRONG, chat, client, health, serving, tiny_parts, wait_for
from tests.steer.helpers import chat_ids, greedy, pad_batch

PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hi", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def tiny(chatml_tokenizer, tmp_path_factory):
    return tiny_parts(chatml_tokenizer, tmp_path_factory.mktemp("serve_batching"))


def test_mixed_batch_equals_each_request_alone(tiny):
    model, tok, sae_dir = tiny
    seqs = chat_ids(tok, PROMPTS)
    ids, mask = pad_batch(seqs, tok.pad_token_id, side="left")
    with torch.no_grad():  # first: the plain model is batch-invariant on these prompts (left padding)
        batched = greedy(model.generate, ids, mask, 8, tok.pad_token_id)
        for row, seq in enumerate(seqs):
            alone = greedy(model.generate, *pad_batch([seq], tok.pad_token_id), 8, tok.pad_token_id)
            assert torch.equal(batched[row], alone[0])
    requests = [
        dict(text=PROMPTS[0], steering=STRONG),
        dict(text=PROMPTS[1], steering=None),
        dict(text=PROMPTS[2], steering=OTHER),
        dict(text=PROMPTS[3], steering=STRONG, temperature=1.0, seed=3),
    ]
    with serving(model, tok, sae_dir, window=0.3, max_batch=4) as server:
        cl = client(server)

        def ask(req: dict) -> str:
            req = dict(req)
            return chat(cl, req.pop("text"), max_tokens=8, **req).choices[0].message.content

        before = health(server)
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(ask, requests))
        after = health(server)
        assert after["batches"] - before["batches"] == 1 and after["largest_batch"] == 4, after
        alone = [ask(req) for req in requests]
        assert health(server)["batches"] - after["batches"] == 4
    assert together == alone
    assert together[0] != ask_plain(model, tok, PROMPTS[0]) and together[2] != ask_plain(
        model, tok, PROMPTS[2]
    )


def ask_plain(model, tok, text: str) -> str:
    seq = chat_ids(tok, [text])
    with torch.no_grad():
        out = greedy(model.generate, *pad_batch(seq, tok.pad_token_id), 8, tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def test_full_queue_answers_429_at_once(tiny):
    with serving(*tiny, window=0.0, max_batch=1, max_queue=1, max_new_tokens=2000) as server:
        cl = client(server)
        running = chat(cl, PROMPTS[0], max_tokens=2000, stream=True)
        next(iter(running))  # the first request is generating
        queued = ThreadPoolExecutor(1).submit(chat, cl, PROMPTS[1], max_tokens=4)
        wait_for(lambda: health(server)["queued"] == 1, "the second request to be queued")
        with pytest.raises(openai.RateLimitError) as caught:
            chat(cl, PROMPTS[2], max_tokens=4)
        assert health(server)["queued"] == 1, "refused while the queue was full, not after waiting"
        assert caught.value.status_code == 429 and "queue is full" in caught.value.body["message"]
        running.close()  # frees the engine: the queued request runs next
        assert queued.result(timeout=120).choices[0].finish_reason == "length"
        assert health(server)["refused"] == 1
        assert chat(cl, PROMPTS[2], max_tokens=4).choices[0].message.content is not None


def test_api_key(tiny):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(ValueError, match="--api-key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "key")
    with serving(*tiny, api_key="sekrit") as server:
        for key in ("wrong", "sekri", "sekrit2"):
            with pytest.raises(openai.AuthenticationError) as caught:
                client(server, key).models.list()
            assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
        assert health(server)["status"] == "ok"  # open without a key
        assert [m.id for m in client(server, "sekrit").models.list()] == ["tiny"]
        assert chat(client(server, "sekrit"), PROMPTS[0], max_tokens=3).usage.completion_tokens == 3


def _live_rows() -> int:
    gc.collect()
    return sum(type(o) in (Row, RowDecoder) for o in gc.get_objects())


def _give_up_while_running(server, body: dict) -> None:
    """A client that gives up on a reply it did not stream: it hangs up once its row is generating."""
    url = httpx.URL(server.url)
    content = json.dumps(body).encode()
    head = (f"POST {url.raw_path.decode()}/chat/completions HTTP/1.1\r\nHost: {url.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n")  # fmt: skip
    running = health(server)["running"]
    with socket.create_connection((url.host, url.port)) as sock:
        sock.sendall(head.encode() + content)
        wait_for(lambda: health(server)["running"] == running + 1, "the row to run")


def test_disconnect_cancels_the_row_and_keeps_nothing(tiny):
    with serving(*tiny, window=0.0, max_new_tokens=1000) as server:
        cl = client(server)
        before = health(server)
        stream = chat(cl, PROMPTS[0], max_tokens=1000, stream=True)
        chunks = iter(stream)
        next(chunks), next(chunks)
        stream.close()
        wait_for(
            lambda: health(server)["cancelled_rows"] == before["cancelled_rows"] + 1, "the row to cancel"
        )
        after = health(server)
        assert after["running"] == 0 and after["generated_tokens"] - before["generated_tokens"] < 500

        _give_up_while_running(server, {"model": "tiny", "max_tokens": 1000, "min_tokens": 1000,
                                        "messages": [{"role": "user", "content": PROMPTS[3]}]})  # fmt: skip
        wait_for(
            lambda: health(server)["cancelled_rows"] == before["cancelled_rows"] + 2, "the row to cancel"
        )
        after = health(server)
        assert after["running"] == 0 and after["generated_tokens"] - before["generated_tokens"] < 1500

        def disconnect() -> None:
            s = chat(cl, PROMPTS[1], max_tokens=1000, stream=True)
            next(iter(s))
            s.close()

        for _ in range(20):  # warm-up: allocator pools, compiled specs, connection pools
            disconnect()
        wait_for(lambda: health(server)["running"] == 0, "the last row to end")
        tracemalloc.start()
        gc.collect()
        start_size = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            disconnect()
        wait_for(lambda: health(server)["running"] == 0, "the last row to end")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start_size
        tracemalloc.stop()
        final = health(server)
        assert final["cancelled_rows"] - after["cancelled_rows"] == 220
        assert grown < 1_000_000, f"traced memory grew by {grown} bytes over 200 disconnects"
        assert _live_rows() == 0
        assert chat(cl, PROMPTS[2], max_tokens=5).usage.completion_tokens == 5  # still serving


def test_finished_rows_leave_the_batch_running(tiny):
    """A row that stops early (short max_tokens, stop string) ends; its batch-mates run to their own end."""
    with serving(*tiny, window=0.5, max_batch=3) as server:
        cl = client(server)
        lengths = [2, 9, 5]
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(lambda n: chat(cl, PROMPTS[0], max_tokens=n), lengths))
        assert [o.usage.completion_tokens for o in outs] == lengths
        texts = [o.choices[0].message.content for o in outs]
        assert texts[1].startswith(texts[2]) and texts[2].startswith(texts[0])
        assert health(server)["largest_batch"] == 3


def test_threads_do_not_share_rows(tiny):
    """Eight clients at once on one server: every reply equals the same request sent alone."""
    with serving(*tiny, window=0.05, max_batch=8) as server:
        cl = client(server)
        specs = [STRONG, None, OTHER, None] * 2
        results: dict[int, str] = {}

        def ask(i: int) -> None:
            results[i] = chat(cl, PROMPTS[i % 4], steering=specs[i], max_tokens=6).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(8):
            assert (
                results[i]
                == chat(cl, PROMPTS[i % 4], steering=specs[i], max_tokens=6).choices[0].message.content
            )

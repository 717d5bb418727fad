"""Deterministic judges behind a real OpenAI-compatible HTTP endpoint on 127.0.0.1.

They go through exactly the client path a real judge does, so the metric arithmetic can be checked end to end:
a constant judge must give balanced accuracy 0.5, a random one about 0.5 (the controls), and the tests add an
oracle. `respond(body)` maps a request body to a `FakeAnswer`; the server counts the requests it answered.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class FakeAnswer:
    """What the fake judge answers: `text` with HTTP 200, or an error `status`. `digit_probs` gives the
    log-prob alternatives at the first digit after `[[` (when the request asks for log-probs)."""

    text: str = ""
    status: int = 200
    digit_probs: dict[str, float] | None = None
    retry_after: float | None = None


Respond = Callable[[dict[str, Any]], FakeAnswer]


class FakeJudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, respond: Respond, accept_logprobs: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond, self.accept_logprobs = respond, accept_logprobs
        self.hits = 0
        self.bodies: list[dict[str, Any]] = []
        self.headers_seen: list[dict[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeJudgeServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with self.server.lock:
            self.server.hits += 1
            self.server.bodies.append(body)
            self.server.headers_seen.append(dict(self.headers))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if body.get("logprobs") and not self.server.accept_logprobs:
            return self._send(400, {"error": {"message": "logprobs are not supported", "param": "logprobs"}})
        answer = self.server.respond(body)
        if answer.status != 200:
            headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after is not None else {}
            return self._send(answer.status, {"error": {"message": f"fake status {answer.status}"}}, headers)
        message = {"role": "assistant", "content": answer.text}
        logprobs = _logprobs(answer) if body.get("logprobs") else None
        self._send(
            200, {"choices": [{"index": 0, "message": message, "logprobs": logprobs}], "model": body["model"]}
        )

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _logprobs(answer: FakeAnswer) -> dict[str, Any]:
    """Tokens: the text before the first digit after `[[`, that digit (with `digit_probs` as alternatives),
    and the rest; the whole text as one token when there is no such digit."""
    text = answer.text
    at = text.find("[[")
    pos = at + 2 if at >= 0 and text[at + 2 : at + 3].isdigit() else -1
    if pos < 0:
        return {
            "content": [{"token": text, "logprob": 0.0, "top_logprobs": [{"token": text, "logprob": 0.0}]}]
        }
    digit, probs = text[pos], answer.digit_probs or {text[pos]: 1.0}
    top = [{"token": d, "logprob": math.log(p)} for d, p in probs.items() if p > 0]
    content = [{"token": text[:pos], "logprob": 0.0, "top_logprobs": []}] if pos else []
    content.append({"token": digit, "logprob": math.log(probs.get(digit, 1.0)), "top_logprobs": top})
    if text[pos + 1 :]:
        content.append({"token": text[pos + 1 :], "logprob": 0.0, "top_logprobs": []})
    return {"content": content}


@contextmanager
def serve_fake_judge(respond: Respond, accept_logprobs: bool = True) -> Iterator[FakeJudgeServer]:
    """A running fake judge (in a thread), shut down on exit."""
    server = FakeJudgeServer(respond, accept_logprobs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def constant(text: str) -> Respond:
    """Always the same answer."""
    return lambda body: FakeAnswer(text)


def random_digits(digits: str, seed: int = 0) -> Respond:
    """`[[d]] [[random]]`, d drawn from `digits` by a hash of the request and `seed` (same request, same d)."""

    def respond(body: dict[str, Any]) -> FakeAnswer:
        key = json.dumps(body["messages"], sort_keys=True) + str(seed)
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        return FakeAnswer(f"[[{rng.choice(digits)}]] [[random]]")

    return respond

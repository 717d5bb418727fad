"""A judge: any OpenAI-compatible `/v1/chat/completions` endpoint, asked asynchronously.

- Greedy (temperature 0) with a seed; `logprobs` / `top_logprobs` are asked for, and an endpoint that refuses
  them (HTTP 400 naming them) is remembered and asked without them from then on.
- At most `concurrency` requests in flight; connection errors, timeouts, 429 and 5xx are retried with
  exponential backoff, at most `retries` times and never past `deadline_s`; then `JudgeUnavailableError`
  names the URL and every attempt.
- Every answer is cached by content (model, messages, settings) as one JSON file under `cache_dir`, named by its
  `cache_id`: a rerun sends nothing, and every score points at the exact answer it came from. The API key is
  read from the environment and never written anywhere.
- A request the judge rejects (another 4xx) is answered as missing (`JudgeReply.error`), never as a score,
  and is not cached (a rerun asks again).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from tqdm.auto import tqdm

from steer.errors import ConfigError, FastSteerError

KEY_ENV_VARS = ("FAST_STEER_JUDGE_KEY", "OPENAI_API_KEY")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
FATAL_STATUSES = frozenset({401, 403, 404})
CACHE_VERSION = 1


class JudgeUnavailableError(FastSteerError):
    """The judge could not be reached, or kept failing, after the retries."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how it is asked."""

    url: str
    """Base URL of an OpenAI-compatible server, e.g. `http://127.0.0.1:8000` or `https://api.openai.com/v1`."""
    model: str
    """The model name sent in every request (and recorded in the results)."""
    cache_dir: Path
    """Folder of the content-addressed answer cache (one JSON file per request)."""
    seed: int = 0
    """Seed sent with every request (servers that support it decode reproducibly)."""
    max_tokens: int = 64
    """Default completion budget of one answer."""
    progress: bool = True
    """Show a progress bar (requests/s) while answers are pending."""
    top_logprobs: int = 5
    """Alternatives per token asked for (0: ask for no log-probs at all)."""
    concurrency: int = 8
    """Most requests in flight at once."""
    retries: int = 2
    """Retries of one request after a connection error, timeout, 429 or 5xx."""
    backoff_s: float = 1.0
    """First retry waits this long, each later one twice as long (a server's Retry-After is honoured, capped)."""
    timeout_s: float = 120.0
    """Limit of one HTTP attempt."""
    deadline_s: float = 600.0
    """Limit of one request, its retries and waits included."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"judge URL must start with http:// or https://, got {self.url!r}")
        if not self.model:
            raise ConfigError("give the judge model name (--judge-model)")
        for name in ("max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"judge {name} must be at least 1, got {getattr(self, name)}")
        if self.retries < 0 or not 0 <= self.top_logprobs <= 20:
            raise ConfigError("judge retries must be >= 0 and top_logprobs within 0..20")
        if min(self.timeout_s, self.deadline_s) <= 0 or self.backoff_s < 0:
            raise ConfigError("judge timeout_s and deadline_s must be positive, backoff_s not negative")

    @property
    def endpoint(self) -> str:
        """The chat-completions URL: `/v1/chat/completions` added to a bare server, `/chat/completions` to a
        URL ending in `/v1` (a query string is kept)."""
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            path += "/chat/completions" if path.endswith("/v1") else "/v1/chat/completions"
        return urlunsplit(parts._replace(path=path))

    @property
    def public_endpoint(self) -> str:
        """The endpoint without user:password or query (what results and errors show)."""
        parts = urlsplit(self.endpoint)
        netloc = str(parts.hostname) + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def settings(self) -> dict[str, Any]:
        """What the results record about the judge (never the key)."""
        out = asdict(self)
        out["url"] = self.public_endpoint
        out["cache_dir"] = str(self.cache_dir)
        out["key_from"] = next((name for name in KEY_ENV_VARS if os.environ.get(name)), None)
        return out


@dataclass(frozen=True)
class JudgeRequest:
    """One conversation to send; `seed` / `max_tokens` override the config's."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    seed: int | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability and the alternatives the server listed."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class JudgeReply:
    """The judge's answer: `text` is None when the request was rejected (`error` says why)."""

    cache_id: str
    text: str | None
    logprobs: tuple[TokenLogprob, ...] | None = None
    error: str | None = None
    from_cache: bool = False


@dataclass
class JudgeStats:
    """Counters of one judge, and requests in flight over time (for the benchmark)."""

    concurrency: int
    requests: int = 0  # answers asked for
    cache_hits: int = 0
    http_attempts: int = 0
    retries: int = 0
    rejected: int = 0
    peak_in_flight: int = 0
    busy_s: float = 0.0  # time with work pending (inside `ask_many`)
    in_flight_s: float = 0.0  # integral of requests in flight over that time
    capacity_s: float = (
        0.0  # integral of min(requests still unanswered, concurrency): what could be in flight
    )
    _in_flight: int = field(default=0, repr=False)
    _unanswered: int = field(default=0, repr=False)
    _last: float = field(default=0.0, repr=False)

    def _tick(self) -> None:
        now = time.monotonic()
        self.in_flight_s += self._in_flight * (now - self._last)
        self.capacity_s += min(self._unanswered, self.concurrency) * (now - self._last)
        self._last = now

    def want(self) -> None:
        """One more request that needs an HTTP answer (not a cache hit)."""
        self._tick()
        self._unanswered += 1

    def answered(self) -> None:
        self._tick()
        self._unanswered -= 1

    def begin_busy(self) -> float:
        self._last = time.monotonic()
        return self._last

    def end_busy(self, started: float) -> None:
        self._tick()
        self.busy_s += time.monotonic() - started

    def enter(self) -> None:
        self._tick()
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

    def exit(self) -> None:
        self._tick()
        self._in_flight -= 1

    def as_dict(self) -> dict[str, Any]:
        mean = self.in_flight_s / self.busy_s if self.busy_s > 0 else 0.0
        # requests in flight over what could be in flight (the limit, or fewer when fewer are left):
        # 1.0 = the client never idles; the ramp and the tail of a batch do not count against it
        utilisation = self.in_flight_s / self.capacity_s if self.capacity_s > 0 else 0.0
        return {
            "requests": self.requests,
            "cache_hits": self.cache_hits,
            "http_attempts": self.http_attempts,
            "retries": self.retries,
            "rejected": self.rejected,
            "concurrency": self.concurrency,
            "peak_in_flight": self.peak_in_flight,
            "mean_in_flight": mean,
            "utilisation": utilisation,
        }


class Judge:
    """Asks one endpoint; see the module docstring."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.stats = JudgeStats(concurrency=config.concurrency)
        self.logprobs_accepted = config.top_logprobs > 0  # set False once the endpoint refuses them
        self._key = next((os.environ[name] for name in KEY_ENV_VARS if os.environ.get(name)), None)

    def cache_id(self, request: JudgeRequest) -> str:
        """Hash of what determines the answer: model, messages and settings."""
        return hashlib.sha256(json.dumps(self._identity(request), sort_keys=True).encode()).hexdigest()[:32]

    def cache_path(self, cache_id: str) -> Path:
        return self.config.cache_dir / cache_id[:2] / f"{cache_id}.json"

    def cached(self, cache_id: str) -> dict[str, Any]:
        """The cached record of one answer (request, raw response, date)."""
        return json.loads(self.cache_path(cache_id).read_text(encoding="utf-8"))

    async def ask_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        """The replies to `requests`, in order (cached ones without a request)."""
        started = self.stats.begin_busy()
        limit = asyncio.Semaphore(self.config.concurrency)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        try:
            async with httpx.AsyncClient(headers=headers, timeout=self.config.timeout_s) as client:
                bar = tqdm(total=len(requests), desc="judge", unit="req", disable=not self.config.progress)
                tasks = [asyncio.create_task(self._ask(client, limit, r)) for r in requests]
                for task in tasks:
                    task.add_done_callback(lambda _task: bar.update())
                try:
                    return list(await asyncio.gather(*tasks))
                except BaseException:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise
                finally:
                    bar.close()
        finally:
            self.stats.end_busy(started)

    def _identity(self, request: JudgeRequest) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "model": self.config.model,
            "messages": [list(m) for m in request.messages],
            "temperature": 0,
            "seed": self.config.seed if request.seed is None else request.seed,
            "max_tokens": request.max_tokens or self.config.max_tokens,
            "top_logprobs": self.config.top_logprobs,
        }

    async def _ask(
        self, client: httpx.AsyncClient, limit: asyncio.Semaphore, request: JudgeRequest
    ) -> JudgeReply:
        self.stats.requests += 1
        cache_id = self.cache_id(request)
        path = self.cache_path(cache_id)
        if path.exists():
            self.stats.cache_hits += 1
            return _reply(cache_id, json.loads(path.read_text(encoding="utf-8"))["response"], True)
        self.stats.want()
        try:
            async with limit:
                self.stats.enter()
                try:
                    body, sent_logprobs = await self._post(client, request)
                finally:
                    self.stats.exit()
        finally:
            self.stats.answered()
        if "error" in body:
            self.stats.rejected += 1
            return JudgeReply(cache_id, None, error=body["error"])
        record = {
            "id": cache_id,
            "request": self._identity(request) | {"logprobs_sent": sent_logprobs},
            "endpoint": self.config.public_endpoint,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "response": body,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        return _reply(cache_id, body, False)

    async def _post(self, client: httpx.AsyncClient, request: JudgeRequest) -> tuple[dict[str, Any], bool]:
        """The response body (or `{"error": ...}` for a rejected request) and whether log-probs were asked."""
        cfg = self.config
        deadline = time.monotonic() + cfg.deadline_s
        tried: list[str] = []
        while True:
            want_logprobs = self.logprobs_accepted
            payload = self._payload(request, want_logprobs)
            self.stats.http_attempts += 1
            timeout = max(0.001, min(cfg.timeout_s, deadline - time.monotonic()))
            wait: float | None = None
            try:
                response = await client.post(cfg.endpoint, json=payload, timeout=timeout)
            except httpx.TransportError as err:
                tried.append(f"{type(err).__name__}: {err or 'no detail'}")
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json(), want_logprobs
                    except ValueError:
                        return {
                            "error": f"HTTP 200 with a body that is not JSON: {response.text[:200]}"
                        }, want_logprobs
                detail = response.text[:300]
                if status == 400 and want_logprobs and "logprob" in detail.lower():
                    self.logprobs_accepted = False  # remembered: this endpoint is asked without them
                    continue
                if status in FATAL_STATUSES:
                    raise JudgeUnavailableError(
                        f"judge at {cfg.public_endpoint} answered HTTP {status} for model {cfg.model!r}: "
                        f"{detail} (check --judge-url, --judge-model and the key in {KEY_ENV_VARS[0]})"
                    )
                if status not in RETRY_STATUSES:
                    return {"error": f"HTTP {status}: {detail}"}, want_logprobs
                tried.append(f"HTTP {status}: {detail}")
                wait = _retry_after(response)
            if len(tried) > cfg.retries:
                break
            pause = cfg.backoff_s * 2 ** (len(tried) - 1)
            pause = min(wait, 4 * pause + 1) if wait is not None else pause
            if time.monotonic() + pause >= deadline:
                tried.append(f"deadline of {cfg.deadline_s:g} s reached")
                break
            self.stats.retries += 1
            await asyncio.sleep(pause)
        attempts = "; ".join(f"{i + 1}. {t}" for i, t in enumerate(tried))
        raise JudgeUnavailableError(
            f"judge at {cfg.public_endpoint} (model {cfg.model!r}) did not answer after "
            f"{cfg.retries + 1} attempt(s): {attempts}. Is the server running and reachable?"
        )

    def _payload(self, request: JudgeRequest, logprobs: bool) -> dict[str, Any]:
        identity = self._identity(request)
        payload: dict[str, Any] = {
            "model": identity["model"],
            "messages": [{"role": r, "content": c} for r, c in request.messages],
            "temperature": 0,
            "seed": identity["seed"],
            "max_tokens": identity["max_tokens"],
        }
        if logprobs:
            payload |= {"logprobs": True, "top_logprobs": self.config.top_logprobs}
        return payload


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _reply(cache_id: str, body: dict[str, Any], from_cache: bool) -> JudgeReply:
    """Text and log-probs of an OpenAI chat completion body (an odd body is a missing answer)."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return JudgeReply(
            cache_id, None, error="response has no choices[0].message.content", from_cache=from_cache
        )
    entries = ((choice.get("logprobs") or {}).get("content")) or None
    logprobs = (
        tuple(
            TokenLogprob(
                e["token"],
                float(e["logprob"]),
                tuple((t["token"], float(t["logprob"])) for t in e.get("top_logprobs") or ()),
            )
            for e in entries
        )
        if entries
        else None
    )
    return JudgeReply(cache_id, text if isinstance(text, str) else None, logprobs, from_cache=from_cache)

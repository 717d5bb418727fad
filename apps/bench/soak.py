"""`fast-steer bench serve --soak`: a load and fault test of `fast-steer serve`, bounded in count and time.

The server runs in this process (a background thread, real HTTP on 127.0.0.1) with a random SAE, and with a
fault hook that fails the row of any request sampled with `FAULT_SEED`. `clients` asyncio clients (httpx)
share a shuffled plan of `requests` requests:
- good ones: chat and text completions, plain or steered (specs over the random SAE), greedy or seeded
  sampling, some streamed;
- 10% streams that their client drops after the first chunk (the server cancels the row);
- 10% bad requests, each kind in turn (`bad_requests`), each expecting its own 4xx;
- one request, in the middle of the plan, that the fault hook fails: a 500 with an error id, while the
  requests in flight beside it are answered as usual.
A warm-up of the same mix (not counted) runs first; then tracemalloc traces the soak, up to the moment the
engine is idle again. Last, a sample of the greedy replies is asked again one request at a time and compared
with the soak's reply.

The JSON: answers by class (200, 4xx, 5xx, none) as expected or not, the fault and its neighbours, greedy
replies identical to their solo runs, traced memory growth, latency quantiles and the engine's counters.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import re
import time
import tracemalloc
from array import array
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from apps.bench.serve import SAE_NAME, ServerBenchConfig, load_served, quantile
from apps.bench.steer import PROMPTS

if TYPE_CHECKING:
    import httpx
    from tqdm import tqdm

    from apps.serve.app import Service
    from apps.serve.rows import Row
    from apps.serve.schemas import Limits

MODEL_NAME = "bench"
FAULT_SEED = 424_242  # the sampling seed that the soak's fault hook fails
SHARES = {"bad": 0.10, "disconnect": 0.10}  # of the requests; the rest are good, bar the one fault
STREAMED, STEERED, TEXT, SAMPLED = 0.3, 0.5, 0.2, 0.25  # shares of the good requests
WARMUP_PER_CLIENT = 2  # warm-up requests per client
GOALS = {"unexpected": 0, "memory_growth_bytes": 5_000_000, "greedy_identical_share": 1.0}
ERROR_ID = re.compile(r"internal error, id [0-9a-f]{32} \(see the server log\)")
JSON_HEADERS = {"Content-Type": "application/json"}
CLASSES = ("200", "4xx", "5xx", "other")  # "other": no answer (a transport error) or another status
REPORTED_PROBLEMS = 10  # unexpected answers listed in the JSON
IDLE_TIMEOUT_S = 120.0  # longest wait for the engine to finish cancelled rows after the last answer
TOP_LINES = 5  # source lines of the most traced memory growth listed in the JSON
T = TypeVar("T")


@dataclass
class SoakConfig(ServerBenchConfig):
    """`fast-steer bench serve --soak`."""

    requests: int = 2000
    """Requests of the soak (a warm-up of the same mix comes first, not counted)."""
    clients: int = 32
    """Concurrent clients."""
    max_seconds: float = 3600.0
    """Seconds of soak after which no request is sent (those in flight finish)."""
    compared: int = 32
    """Greedy replies asked again one request at a time and compared with the soak's."""
    seed: int = 0
    """Seed of the plan: which request is what."""


class InjectedFault(RuntimeError):
    """What the soak's fault hook raises."""


def fail_marked_row(row: Row) -> None:
    """The soak's fault hook (`Engine(fault=...)`): a row sampled with `FAULT_SEED` raises before its first token."""
    if row.params.seed == FAULT_SEED:
        raise InjectedFault(f"the soak's deliberate fault (seed {FAULT_SEED})")


@dataclass(frozen=True)
class Planned:
    """One request of the plan: `kind` is plain, steered, disconnect, fault or `bad:<what>`."""

    kind: str
    path: str
    body: bytes
    stream: bool
    greedy: bool
    expect: int  # the HTTP status a correct server answers


class Answer(NamedTuple):
    """What came back: the HTTP status (0: none), the reply text of a whole reply, and what went wrong if
    the answer is not a whole reply (the error message, or why the stream was incomplete)."""

    status: int
    text: str | None = None
    error: str | None = None


def _generation(path: str, text: str, new_tokens: int, **fields) -> dict:
    body = {"model": MODEL_NAME, "max_tokens": new_tokens, **fields}
    if path == "/completions":
        return body | {"prompt": text}
    return body | {"messages": [{"role": "user", "content": text}]}


def _specs(layer: int) -> list[dict]:
    """Three specs over the random SAE, so batches hold several spec groups."""
    return [
        {
            "sae": SAE_NAME,
            "layer": layer,
            "edits": [{"feature": f, "op": "add", "strength": s}],
            "positions": p,
        }
        for f, s, p in ((1, 8.0, "special"), (2, -6.0, "generated"), (3, 4.0, "all"))
    ]


def bad_requests(limits: Limits, layer: int) -> dict[str, tuple[bytes, int]]:
    """The bad requests of the soak by name: (body, expected status)."""
    good = _generation("/chat/completions", PROMPTS[0], limits.max_new_tokens, temperature=0)
    spec = _specs(layer)[0]
    edits = [{"feature": 1, "op": "add", "strength": 1.0}] * (limits.max_edits_per_spec + 1)
    long_prompt = " x" * (limits.max_prompt_tokens + 1)  # one token or more per word
    bodies = {
        "too_many_edits": (good | {"steering": spec | {"edits": edits}}, 400),
        "unknown_sae": (good | {"steering": spec | {"sae": "no-such-sae"}}, 400),
        "unknown_model": (good | {"model": "no-such-model"}, 404),
        "prompt_too_long": (good | {"messages": [{"role": "user", "content": long_prompt}]}, 400),
        "too_many_new_tokens": (good | {"max_tokens": limits.max_new_tokens + 1}, 400),
        "unknown_field": (good | {"frobnicate": True}, 400),
    }
    out = {name: (json.dumps(body).encode(), status) for name, (body, status) in bodies.items()}
    return {"malformed_json": (b'{"model": "' + MODEL_NAME.encode() + b'", "messages": [', 400), **out}


def make_plan(
    n: int, cfg: SoakConfig, limits: Limits, layer: int, rng: random.Random, fault: bool
) -> list[Planned]:
    """`n` requests in a shuffled order: the shares of `SHARES`, the bad kinds in turn, and (with `fault`) the
    fault request in the middle."""
    n_bad, n_disconnect = (round(share * n) for share in SHARES.values())
    n_fault = int(fault and n > n_bad + n_disconnect)
    kinds = ["bad"] * n_bad + ["disconnect"] * n_disconnect + ["good"] * (n - n_bad - n_disconnect - n_fault)
    rng.shuffle(kinds)
    if n_fault:
        kinds.insert(n // 2, "fault")
    bad = list(bad_requests(limits, layer).items())
    specs = _specs(layer)
    plan, n_bad_made = [], 0
    for kind in kinds:
        prompt = rng.choice(PROMPTS)
        if kind == "bad":
            name, (body, status) = bad[n_bad_made % len(bad)]
            n_bad_made += 1
            plan.append(Planned(f"bad:{name}", "/chat/completions", body, False, False, status))
        elif kind == "fault":
            body = _generation("/chat/completions", prompt, cfg.new_tokens, temperature=0, seed=FAULT_SEED)
            plan.append(Planned("fault", "/chat/completions", json.dumps(body).encode(), False, True, 500))
        elif kind == "disconnect":  # min_tokens: the row is still generating when its client goes
            steering = rng.choice(specs) if rng.random() < STEERED else None
            body = _generation("/chat/completions", prompt, cfg.new_tokens, temperature=0, stream=True,
                               min_tokens=cfg.new_tokens, steering=steering)  # fmt: skip
            plan.append(
                Planned("disconnect", "/chat/completions", json.dumps(body).encode(), True, True, 200)
            )
        else:
            path = "/completions" if rng.random() < TEXT else "/chat/completions"
            steered, stream, greedy = (rng.random() < share for share in (STEERED, STREAMED, 1 - SAMPLED))
            fields = {"steering": rng.choice(specs) if steered else None, "stream": stream}
            fields |= (
                {"temperature": 0} if greedy else {"temperature": 0.8, "seed": rng.randrange(FAULT_SEED)}
            )
            body = json.dumps(_generation(path, prompt, cfg.new_tokens, **fields)).encode()
            plan.append(Planned("steered" if steered else "plain", path, body, stream, greedy, 200))
    return plan


class Ledger:
    """What each request of the plan got, in arrays allocated before the soak (so the bench's own records do
    not count as the server's memory growth), plus the kept greedy replies and the first problems."""

    def __init__(self, plan: list[Planned], keep: set[int]) -> None:
        n = len(plan)
        self.plan = plan
        self.status = array("h", [0]) * n  # HTTP status; 0: none (not sent, or no answer)
        self.ok = array("b", [0]) * n  # 1: the answer was the expected one
        self.sent = array("b", [0]) * n
        self.start = array("d", [0.0]) * n
        self.end = array("d", [0.0]) * n
        self.replies: dict[int, str | None] = dict.fromkeys(keep)  # greedy replies to compare
        self.problems: list[dict] = []

    def record(self, i: int, answer: Answer, start: float, end: float) -> None:
        item = self.plan[i]
        ok = _as_expected(item, answer)
        self.status[i], self.ok[i], self.sent[i] = answer.status, ok, 1
        self.start[i], self.end[i] = start, end
        if i in self.replies:
            self.replies[i] = answer.text
        if not ok and len(self.problems) < REPORTED_PROBLEMS:
            self.problems.append({"index": i, "kind": item.kind, "expected": item.expect, **answer._asdict()})

    @property
    def unexpected(self) -> int:
        return sum(s and not o for s, o in zip(self.sent, self.ok, strict=True))


def _as_expected(item: Planned, answer: Answer) -> bool:
    if answer.status != item.expect:
        return False
    if item.kind == "fault":  # a bug's 500 names an error id, never the exception
        return answer.error is not None and ERROR_ID.fullmatch(answer.error) is not None
    return item.expect != 200 or answer.error is None


def _status_class(status: int) -> str:
    if status == 200:
        return "200"
    return {4: "4xx", 5: "5xx"}.get(status // 100, "other")


def _refusal(response: httpx.Response) -> Answer:
    """A status other than 200, with the message of its OpenAI-shaped error (or the start of its body)."""
    try:
        return Answer(response.status_code, None, response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return Answer(response.status_code, None, f"not an OpenAI error: {response.text[:200]!r}")


async def _post(client: httpx.AsyncClient, url: str, item: Planned) -> Answer:
    response = await client.post(url + item.path, content=item.body, headers=JSON_HEADERS)
    if response.status_code != 200:
        return _refusal(response)
    choice = response.json()["choices"][0]
    return Answer(200, choice["message"]["content"] if "message" in choice else choice["text"])


async def _stream(client: httpx.AsyncClient, url: str, item: Planned, drop: bool) -> Answer:
    """A streamed request; with `drop`, the client goes away after the first chunk (leaving the block closes
    the connection mid-stream)."""
    from apps.serve.app import FAILURE_CODES

    statuses = {code: status for status, code in FAILURE_CODES.items() if code}
    async with client.stream("POST", url + item.path, content=item.body, headers=JSON_HEADERS) as response:
        if response.status_code != 200:
            await response.aread()
            return _refusal(response)
        parts = []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                return Answer(200, "".join(parts))
            event = json.loads(data)
            if "error" in event:  # a failure after the 200: its status is the error code's
                error = event["error"]
                return Answer(statuses.get(error["code"], 400), None, error["message"])
            if drop:
                return Answer(200)
            choice = event["choices"][0]
            parts.append((choice["delta"].get("content") or "") if "delta" in choice else choice["text"])
    return Answer(200, None, "the stream ended without [DONE]")


async def _send(client: httpx.AsyncClient, url: str, item: Planned) -> Answer:
    import httpx

    try:
        if item.stream:
            return await _stream(client, url, item, drop=item.kind == "disconnect")
        return await _post(client, url, item)
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:  # no answer, or not a reply's shape
        return Answer(0, None, f"{type(exc).__name__}: {exc}")


async def _run_plan(client: httpx.AsyncClient, url: str, ledger: Ledger, clients: int, seconds: float,
                    bar: tqdm) -> float:  # fmt: skip
    """Send the plan from `clients` concurrent clients until it is done or `seconds` have passed; returns
    the wall time."""
    todo = iter(range(len(ledger.plan)))  # shared: each index is taken once
    begin = time.perf_counter()

    async def client_loop() -> None:
        for i in todo:
            if time.perf_counter() - begin > seconds:
                return
            start = time.perf_counter()
            answer = await _send(client, url, ledger.plan[i])
            ledger.record(i, answer, start, time.perf_counter())
            bar.update()
            if not ledger.ok[i]:
                bar.set_postfix(unexpected=ledger.unexpected, refresh=False)

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return time.perf_counter() - begin


async def _engine_idle(service: Service) -> None:
    """Wait until the engine holds no row (cancelled rows end at their next step)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while (stats := service.engine.stats())["running"] or stats["queued"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine still holds rows {IDLE_TIMEOUT_S:g} s after the soak: {stats}")
        await asyncio.sleep(0.05)


async def _alone(client: httpx.AsyncClient, url: str, ledger: Ledger) -> dict:
    """Each kept greedy reply asked again on its own (no stream) and compared with the soak's."""
    compared, mismatches = 0, []
    for i, soak_text in ledger.replies.items():
        if soak_text is None:  # not answered as expected: counted there
            continue
        item = ledger.plan[i]
        body = json.loads(item.body) | {"stream": False}
        answer = await _send(
            client, url, Planned(item.kind, item.path, json.dumps(body).encode(), False, True, 200)
        )
        compared += 1
        if answer.text != soak_text:
            mismatches.append({"index": i, "kind": item.kind, "soak": soak_text, "alone": answer.text})
    identical = compared - len(mismatches)
    return {"compared": compared, "identical": identical,
            "identical_share": identical / compared if compared else None, "mismatches": mismatches[:5]}  # fmt: skip


def _summary(ledger: Ledger, fault_index: int | None) -> dict:
    """Answers by class and kind, expected or not; the fault and the requests in flight beside it."""
    answered = {c: {"expected": 0, "unexpected": 0} for c in CLASSES}
    by_kind: dict[str, dict[str, int]] = {}
    for i, item in enumerate(ledger.plan):
        if not ledger.sent[i]:
            continue
        verdict = "expected" if ledger.ok[i] else "unexpected"
        answered[_status_class(ledger.status[i])][verdict] += 1
        kind = by_kind.setdefault(item.kind, {"sent": 0, "expected": 0})
        kind["sent"] += 1
        kind["expected"] += ledger.ok[i]
    fault = None
    if fault_index is not None and ledger.sent[fault_index]:
        start, end = ledger.start[fault_index], ledger.end[fault_index]
        beside = [i for i, item in enumerate(ledger.plan) if i != fault_index and ledger.sent[i]
                  and not item.kind.startswith("bad:") and ledger.start[i] < end and ledger.end[i] > start]  # fmt: skip
        fault = {"index": fault_index, "status": ledger.status[fault_index],
                 "as_expected": bool(ledger.ok[fault_index]), "in_flight_beside": len(beside),
                 "in_flight_beside_as_expected": sum(ledger.ok[i] for i in beside)}  # fmt: skip
    return {"answered": answered, "by_kind": dict(sorted(by_kind.items())), "fault": fault}


def _latency(ledger: Ledger) -> dict:
    """Quantiles of the whole good replies' latencies (request sent to last byte)."""
    times = sorted(ledger.end[i] - ledger.start[i] for i, item in enumerate(ledger.plan)
                   if ledger.ok[i] and item.kind in ("plain", "steered"))  # fmt: skip
    if not times:
        return {"replies": 0}
    return {
        "replies": len(times),
        "p50": quantile(times, 0.5),
        "p95": quantile(times, 0.95),
        "max": times[-1],
    }


async def _traced(run: Awaitable[T]) -> tuple[T, dict]:
    """`run`'s result, and the growth of the memory tracemalloc traced from its start to its end (after a
    garbage collection at each end), its peak, and the lines that grew most."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        start_bytes = tracemalloc.get_traced_memory()[0]  # after the snapshot, which stays alive
        result = await run
        gc.collect()
        end_bytes, peak_bytes = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    finally:
        tracemalloc.stop()
    top = [str(stat) for stat in after.compare_to(before, "lineno")[:TOP_LINES]]
    return result, {"growth_bytes": end_bytes - start_bytes, "peak_growth_bytes": peak_bytes - start_bytes,
                    "top_growth": top}  # fmt: skip


async def _main(service: Service, url: str, warmup: Ledger, ledger: Ledger, cfg: SoakConfig) -> dict:
    import httpx
    from tqdm import tqdm

    pool = httpx.Limits(max_connections=cfg.clients, max_keepalive_connections=cfg.clients)
    timeout = httpx.Timeout(service.limits.request_timeout + 60)
    async with httpx.AsyncClient(limits=pool, timeout=timeout) as client:
        with tqdm(total=len(warmup.plan), desc="soak warm-up", unit="req") as bar:
            await _run_plan(client, url, warmup, cfg.clients, cfg.max_seconds, bar)
        await _engine_idle(service)

        async def soak() -> float:
            with tqdm(total=len(ledger.plan), desc="soak", unit="req") as bar:
                wall = await _run_plan(client, url, ledger, cfg.clients, cfg.max_seconds, bar)
            await _engine_idle(service)
            return wall

        wall, memory = await _traced(soak())
        alone = await _alone(client, url, ledger)
        health = await client.get(url.removesuffix("/v1") + "/health")
    return {"wall_s": wall, "memory": memory, "greedy_alone": alone,
            "health_after": {"http_status": health.status_code, **health.json()}}  # fmt: skip


def run_soak(cfg: SoakConfig) -> dict:
    """The soak on `cfg`'s model: the JSON report."""
    from apps.serve.schemas import Limits
    from apps.serve.server import BackgroundServer, make_service

    loaded, device, layer, saes = load_served(cfg)
    model, tokenizer = loaded
    limits = Limits(max_new_tokens=cfg.new_tokens, max_queue=cfg.clients)  # a client waits for each answer
    rng = random.Random(cfg.seed)
    warmup = make_plan(
        min(cfg.requests, WARMUP_PER_CLIENT * cfg.clients), cfg, limits, layer, rng, fault=False
    )
    plan = make_plan(cfg.requests, cfg, limits, layer, rng, fault=True)
    greedy = [i for i, item in enumerate(plan) if item.greedy and item.kind in ("plain", "steered")]
    keep = set(rng.sample(greedy, min(cfg.compared, len(greedy))))
    ledger = Ledger(plan, keep)
    fault_index = next((i for i, item in enumerate(plan) if item.kind == "fault"), None)
    service = make_service(model, tokenizer, saes, model_name=MODEL_NAME, limits=limits,
                           window=cfg.window_ms / 1000, fault=fail_marked_row)  # fmt: skip
    with BackgroundServer(service) as server:
        run = asyncio.run(_main(service, server.url, Ledger(warmup, set()), ledger, cfg))
    summary = _summary(ledger, fault_index)
    sent = sum(ledger.sent)
    unexpected_5xx = summary["answered"]["5xx"]["unexpected"]
    alone = run["greedy_alone"]
    return {
        "config": {
            **asdict(cfg),
            "device": device,
            "layer": layer,
            "model_source": loaded.source,
            "limits": asdict(limits),
            "warmup_requests": len(warmup),
        },
        "requests": {
            "planned": len(plan),
            "sent": sent,
            "stopped_by_time": sent < len(plan),
            "wall_s": run["wall_s"],
            "per_s": sent / run["wall_s"],
        },
        **summary,
        "unexpected": ledger.unexpected,
        "problems": ledger.problems,
        "greedy_alone": alone,
        "latency_s": _latency(ledger),
        "memory": run["memory"],
        "engine": service.engine.stats(),
        "health_after": run["health_after"],
        "goals": GOALS,
        "meets_goals": {
            "unexpected_5xx": unexpected_5xx == GOALS["unexpected"],
            "unexpected": ledger.unexpected == GOALS["unexpected"],
            "greedy_identical": alone["identical_share"] == GOALS["greedy_identical_share"],
            "memory_growth": run["memory"]["growth_bytes"] < GOALS["memory_growth_bytes"],
        },
    }

"""`fast-steer bench serve`: tokens/s and latency of `fast-steer serve` under 1, 4 and 8 concurrent clients.

The server runs in this process (a background thread, real HTTP on 127.0.0.1) on the default model with a
random SAE; each client sends requests one after the other (chat completions, greedy, a fixed number of
new tokens through `min_tokens`, so every request costs the same). Scenarios at each concurrency:
- `plain`: every request unsteered;
- `mixed`: half the requests steered (`add` of two decoder directions at special positions): every other
  client, alternating each round, so batches hold steered and plain rows together;
and, at the highest concurrency, `one_at_a_time`: the mixed load on a server whose batches hold one row.
Scenarios are interleaved (the order rotates each repeat); ratios are medians over repeats of ratios
within a repeat, so slow phases of a shared machine cancel:
- `mixed_over_plain` at each concurrency (goal >= 0.95);
- `batched_over_one_at_a_time` at the highest concurrency (goal >= 3).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, NamedTuple

from apps.bench.config import ModelBenchConfig
from apps.bench.steer import PROMPTS

if TYPE_CHECKING:
    from apps.serve.steering import NamedSAE
    from hub import LoadedModel

TARGETS = {"mixed_over_plain": 0.95, "batched_over_one_at_a_time": 3.0}
SAE_NAME = "bench"


@dataclass
class ServerBenchConfig(ModelBenchConfig):
    """A model with a random SAE served over HTTP: what `bench serve` and its `--soak` share."""

    new_tokens: int = 32
    """New tokens per request (with --soak: at most)."""
    window_ms: float = 10.0
    """Batch window of the server."""


@dataclass
class BenchServeConfig(ServerBenchConfig):
    """`fast-steer bench serve`."""

    requests_per_client: int = 3
    """Requests each client sends, one after the other."""
    repeats: int = 5
    """Interleaved repeats of every scenario."""
    concurrency: tuple[int, ...] = (1, 4, 8)
    """Client counts measured."""


def _spec(layer: int) -> dict:
    edits = [{"feature": 1, "op": "add", "strength": 8.0}, {"feature": 2, "op": "add", "strength": -4.0}]
    return {"sae": SAE_NAME, "layer": layer, "edits": edits, "positions": "special"}


def _request(url: str, prompt: str, steering: dict | None, new_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one chat completion."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "temperature": 0,
        "steering": steering,
    }
    request = urllib.request.Request(
        url + "/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        usage = json.load(response)["usage"]
    return time.perf_counter() - start, usage["completion_tokens"]


def _load(url: str, clients: int, per_client: int, steering: dict | None, new_tokens: int) -> dict:
    """`clients` closed-loop clients starting together, `per_client` requests each; with `steering`, every
    other client's requests are steered, alternating each round, so a batch holds steered and plain rows."""
    start_line = threading.Barrier(clients)

    def client(c: int) -> list[tuple[float, int]]:
        start_line.wait()
        out = []
        for r in range(per_client):
            spec = steering if (c + r) % 2 == 0 else None
            out.append(_request(url, PROMPTS[(c * per_client + r) % len(PROMPTS)], spec, new_tokens))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for rows in pool.map(client, range(clients)) for x in rows]
    wall = time.perf_counter() - start
    return {"wall": wall, "latencies": [s for s, _ in results], "tokens": sum(n for _, n in results)}


class Served(NamedTuple):
    """What a served benchmark runs on: the loaded model, its device, the steered layer and the random SAE."""

    loaded: LoadedModel
    device: str
    layer: int
    saes: list[NamedSAE]


def load_served(cfg: ModelBenchConfig) -> Served:
    """Load `cfg`'s model and build a random SAE (seed 0) named `SAE_NAME` for its layer."""
    import torch

    from apps.serve.steering import NamedSAE
    from hub import load_model, resolve_device
    from steer import SAEConfig, build_sae

    device = resolve_device(cfg.device)  # again: `bench all` invokes commands without option callbacks
    loaded = load_model(cfg.model, dtype=cfg.dtype, device=device)
    text_config = loaded.model.config.get_text_config()
    layer = text_config.num_hidden_layers // 2 if cfg.layer is None else cfg.layer
    torch.manual_seed(0)
    sae = build_sae(SAEConfig("standard", text_config.hidden_size, cfg.d_sae, device=str(device)))
    return Served(loaded, device, layer, [NamedSAE(SAE_NAME, sae)])


def run_bench(cfg: BenchServeConfig) -> dict:
    from tqdm import tqdm

    from apps.serve.schemas import Limits
    from apps.serve.server import BackgroundServer, make_service

    loaded, device, layer, saes = load_served(cfg)
    model, tokenizer = loaded
    top = max(cfg.concurrency)
    limits = Limits(max_new_tokens=cfg.new_tokens, max_batch=top, max_queue=4 * top)
    window = cfg.window_ms / 1000
    batched = make_service(model, tokenizer, saes, model_name="bench", limits=limits, window=window)
    single = make_service(
        model,
        tokenizer,
        saes,
        model_name="bench",
        limits=Limits(max_new_tokens=cfg.new_tokens, max_batch=1),
        window=window,
    )
    spec = _spec(layer)
    scenarios = [(f"c{c}", name) for c in cfg.concurrency for name in ("plain", "mixed")]
    scenarios.append((f"c{top}", "one_at_a_time"))
    runs: dict[tuple[str, str], list[dict]] = {s: [] for s in scenarios}
    with BackgroundServer(batched) as fast, BackgroundServer(single) as slow:
        _load(fast.url, 1, 1, spec, cfg.new_tokens)  # warm-up: first forward, compiled spec
        with tqdm(total=cfg.repeats * len(scenarios), desc="bench serve", unit="run") as bar:
            for repeat in range(cfg.repeats):
                shift = repeat % len(scenarios)
                for key in scenarios[shift:] + scenarios[:shift]:
                    clients = int(key[0][1:])
                    url = slow.url if key[1] == "one_at_a_time" else fast.url
                    steering = None if key[1] == "plain" else spec
                    runs[key].append(_load(url, clients, cfg.requests_per_client, steering, cfg.new_tokens))
                    bar.update()
    # read once the engines have stopped: a batch is counted just after its replies have gone out
    stats = {"batched": batched.engine.stats(), "one_at_a_time": single.engine.stats()}
    results: dict[str, dict] = {}
    for (level, name), reps in runs.items():
        latencies = sorted(x for r in reps for x in r["latencies"])
        results.setdefault(level, {})[name] = {
            "tokens_per_s": statistics.median(r["tokens"] / r["wall"] for r in reps),
            "p50_latency_s": quantile(latencies, 0.50),
            "p95_latency_s": quantile(latencies, 0.95),
            "requests": sum(len(r["latencies"]) for r in reps),
            "tokens": sum(r["tokens"] for r in reps),
        }

    def paired(a: tuple[str, str], b: tuple[str, str]) -> float:
        return statistics.median(
            (x["tokens"] / x["wall"]) / (y["tokens"] / y["wall"])
            for x, y in zip(runs[a], runs[b], strict=True)
        )

    ratios = {
        "mixed_over_plain": {
            f"c{c}": paired((f"c{c}", "mixed"), (f"c{c}", "plain")) for c in cfg.concurrency
        },
        "batched_over_one_at_a_time": paired((f"c{top}", "mixed"), (f"c{top}", "one_at_a_time")),
    }
    return {
        "config": {**asdict(cfg), "device": device, "layer": layer, "model_source": loaded.source},
        "results": results,
        "ratios": ratios,
        "targets": TARGETS,
        "meets_targets": {
            "mixed_over_plain": {
                k: v >= TARGETS["mixed_over_plain"] for k, v in ratios["mixed_over_plain"].items()
            },
            "batched_over_one_at_a_time": ratios["batched_over_one_at_a_time"]
            >= TARGETS["batched_over_one_at_a_time"],
        },
        "engine": stats,
    }


def quantile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank quantile of sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]

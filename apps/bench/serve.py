"""`fast-steer bench serve`: tokens/s and latency of `fast-steer serve` under concurrent clients, on the HF
engine, the vLLM engine or both.

Each server runs as users start it (`python -m apps serve`, a child process on 127.0.0.1; a vLLM one with the
Python of the vLLM environment) on the same model and a random SAE that the bench saves to a temporary
folder. Each client sends requests one after the other (chat completions, greedy, a fixed number of new tokens
through `min_tokens`, so every request costs the same). Loads at each concurrency, on each engine's server:
- `plain`: every request unsteered;
- `mixed`: half the requests steered (`add` of two decoder directions at special positions): every other
  client, alternating each round, so batches hold steered and plain rows together;
and, with the HF engine, the mixed load at the highest concurrency on `hf_one_at_a_time`, an HF server whose
batches hold one row. Scenarios are interleaved (the order rotates each repeat); ratios are medians over
repeats of ratios within a repeat, so slow phases of a shared machine cancel:
- `mixed_over_plain` of each engine at each concurrency (goal >= 0.95);
- `batched_over_one_at_a_time` of the HF engine at the highest concurrency (goal >= 3);
- with both engines, `vllm_over_hf` of each load at each concurrency (no goal: it depends on the hardware).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from apps.bench.config import ModelBenchConfig
from apps.bench.steer import PROMPTS
from apps.serve.process import serve_process, vllm_cpu_env, vllm_python

if TYPE_CHECKING:
    from apps.serve.steering import NamedSAE
    from hub import LoadedModel
    from steer import SAE

TARGETS = {"mixed_over_plain": 0.95, "batched_over_one_at_a_time": 3.0}
SAE_NAME = "bench"
MODEL_NAME = "bench"  # the model id the servers answer to
ENGINES = {"hf": ("hf",), "vllm": ("vllm",), "both": ("hf", "vllm")}  # --engine: the engines measured
LOADS = ("plain", "mixed")
ONE_AT_A_TIME = "hf_one_at_a_time"  # the HF server whose batches hold one row
IDLE_TIMEOUT_S = 120.0  # longest wait for a server's counters to settle after the last reply


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
    concurrency: tuple[int, ...] = (1, 8, 32)
    """Client counts measured."""
    engine: str = "hf"
    """The server's engine: hf, vllm, or both (interleaved, with vLLM ÷ HF tokens/s)."""
    vllm_python: str | None = None
    """Python of the vLLM environment (default: .venv-vllm/bin/python of this checkout, `make vllm-venv`)."""


def _spec(layer: int) -> dict:
    edits = [{"feature": 1, "op": "add", "strength": 8.0}, {"feature": 2, "op": "add", "strength": -4.0}]
    return {"sae": SAE_NAME, "layer": layer, "edits": edits, "positions": "special"}


def _request(url: str, prompt: str, steering: dict | None, new_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) of one chat completion."""
    body = {
        "model": MODEL_NAME,
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


def bench_sae(cfg: ModelBenchConfig, loaded: LoadedModel, device) -> tuple[int, SAE]:
    """The steered layer (`cfg.layer`, or the middle one) and a random SAE (seed 0) of `cfg.d_sae` features on
    its residual stream, on `device`."""
    import torch

    from hub import sae_metadata
    from steer import SAEConfig, build_sae

    text_config = loaded.model.config.get_text_config()
    layer = text_config.num_hidden_layers // 2 if cfg.layer is None else cfg.layer
    metadata = sae_metadata(loaded.source, layer)
    torch.manual_seed(0)
    sae_cfg = SAEConfig("standard", text_config.hidden_size, cfg.d_sae, device=str(device), metadata=metadata)
    return layer, build_sae(sae_cfg)


def load_served(cfg: ModelBenchConfig) -> Served:
    """Load `cfg`'s model and build the bench's random SAE, named `SAE_NAME`, for its layer."""
    from apps.serve.steering import NamedSAE
    from hub import load_model, resolve_device

    device = resolve_device(cfg.device)  # again: `bench all` invokes commands without option callbacks
    loaded = load_model(cfg.model, dtype=cfg.dtype, device=device)
    layer, sae = bench_sae(cfg, loaded, device)
    return Served(loaded, device, layer, [NamedSAE(SAE_NAME, sae)])


def _scenarios(cfg: BenchServeConfig) -> list[tuple[str, int, str]]:
    """(server, clients, load) of every run of a repeat; a server is named after its engine, or `ONE_AT_A_TIME`."""
    engines = ENGINES[cfg.engine]
    out = [(engine, c, load) for engine in engines for c in cfg.concurrency for load in LOADS]
    if "hf" in engines:
        out.append((ONE_AT_A_TIME, max(cfg.concurrency), "mixed"))
    return out


def _start_server(
    stack: ExitStack, cfg: BenchServeConfig, name: str, device: str, model: str, sae_dir: Path
) -> str:
    """Start the server `name` (until `stack` closes) and return the URL of its OpenAI API."""

    top = max(cfg.concurrency)
    engine, max_batch = ("hf", 1) if name == ONE_AT_A_TIME else (name, top)
    options = (
        *("--model", model, "--engine", engine, "--dtype", cfg.dtype, "--device", device),
        *("--sae", f"{SAE_NAME}={sae_dir}", "--served-model-name", MODEL_NAME),
        *("--max-batch", str(max_batch), "--max-queue", str(4 * top)),
        *("--max-new-tokens", str(cfg.new_tokens), "--batch-window-ms", str(cfg.window_ms)),
    )
    if engine == "vllm":
        process = serve_process(*options, python=vllm_python(cfg.vllm_python), env=vllm_cpu_env())
    else:
        process = serve_process(*options)
    return stack.enter_context(process) + "/v1"


def _idle_stats(url: str) -> dict:
    """A server's engine counters (`/health`) once it has no row queued or running."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
            health = json.load(response)
        if health["queued"] == health["running"] == 0 or time.monotonic() > deadline:
            return {k: v for k, v in health.items() if k not in ("status", "model")}
        time.sleep(0.05)


def run_bench(cfg: BenchServeConfig) -> dict:
    from tqdm import tqdm

    from hub import load_model, resolve_device, save_sae

    if "vllm" in ENGINES[cfg.engine]:
        vllm_python(cfg.vllm_python)  # its clear error before anything loads
    device = resolve_device(cfg.device)
    # the model's config and tokenizer only: the servers read the weights
    loaded = load_model(cfg.model, dtype=cfg.dtype, device=device, weights=False)
    layer, sae = bench_sae(cfg, loaded, "cpu")
    spec = _spec(layer)
    scenarios = _scenarios(cfg)
    runs: dict[tuple[str, int, str], list[dict]] = {s: [] for s in scenarios}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, ExitStack() as stack:
        sae_dir = save_sae(sae, Path(tmp) / SAE_NAME)
        urls = {}
        for name in dict.fromkeys(server for server, _, _ in scenarios):
            urls[name] = _start_server(stack, cfg, name, device, loaded.source, sae_dir)
            _load(urls[name], 2, 1, spec, cfg.new_tokens)  # warm-up: a steered and a plain request
        with tqdm(total=cfg.repeats * len(scenarios), desc="bench serve", unit="run") as bar:
            for repeat in range(cfg.repeats):
                shift = repeat % len(scenarios)
                for key in scenarios[shift:] + scenarios[:shift]:
                    server, clients, load = key
                    steering = spec if load == "mixed" else None
                    runs[key].append(
                        _load(urls[server], clients, cfg.requests_per_client, steering, cfg.new_tokens)
                    )
                    bar.update()
        stats = {name: _idle_stats(url) for name, url in urls.items()}
    results: dict[str, dict] = {}
    for (server, clients, load), reps in runs.items():
        latencies = sorted(x for r in reps for x in r["latencies"])
        results.setdefault(server, {}).setdefault(f"c{clients}", {})[load] = {
            "tokens_per_s": statistics.median(r["tokens"] / r["wall"] for r in reps),
            "p50_latency_s": quantile(latencies, 0.50),
            "p95_latency_s": quantile(latencies, 0.95),
            "requests": sum(len(r["latencies"]) for r in reps),
            "tokens": sum(r["tokens"] for r in reps),
        }
    ratios = _ratios(cfg, runs)
    targets = {name: goal for name, goal in TARGETS.items() if name in ratios}
    meets = {
        "mixed_over_plain": {
            engine: {level: r >= targets["mixed_over_plain"] for level, r in by_level.items()}
            for engine, by_level in ratios["mixed_over_plain"].items()
        }
    }
    if "batched_over_one_at_a_time" in ratios:
        meets["batched_over_one_at_a_time"] = (
            ratios["batched_over_one_at_a_time"] >= targets["batched_over_one_at_a_time"]
        )
    return {
        "config": {**asdict(cfg), "device": device, "layer": layer, "model_source": loaded.source},
        "results": results,
        "ratios": ratios,
        "targets": targets,
        "meets_targets": meets,
        "server_stats": stats,
    }


def _ratios(cfg: BenchServeConfig, runs: dict[tuple[str, int, str], list[dict]]) -> dict:
    """The ratios of the module docstring, each the median over repeats of a ratio within a repeat."""

    def paired(a: tuple[str, int, str], b: tuple[str, int, str]) -> float:
        return statistics.median(
            (x["tokens"] / x["wall"]) / (y["tokens"] / y["wall"])
            for x, y in zip(runs[a], runs[b], strict=True)
        )

    engines, top = ENGINES[cfg.engine], max(cfg.concurrency)
    ratios: dict = {
        "mixed_over_plain": {
            engine: {f"c{c}": paired((engine, c, "mixed"), (engine, c, "plain")) for c in cfg.concurrency}
            for engine in engines
        }
    }
    if "hf" in engines:
        ratios["batched_over_one_at_a_time"] = paired(("hf", top, "mixed"), (ONE_AT_A_TIME, top, "mixed"))
    if len(engines) == 2:
        ratios["vllm_over_hf"] = {
            load: {f"c{c}": paired(("vllm", c, load), ("hf", c, load)) for c in cfg.concurrency}
            for load in LOADS
        }
    return ratios


def quantile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank quantile of sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]

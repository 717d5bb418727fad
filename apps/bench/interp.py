"""`fast-steer bench interp`: how fast interpretability work keeps the model and the judge busy.

Measured in one run (JSON on stdout):
1. collection vs harvesting on the same conversations: `collect_examples` (FAST rendering, forward to layer L,
   SAE encode, sparse storage, the per-feature index; the whole call) against `fast-steer harvest`'s
   `write_cache` (forward to layer L, residuals to disk) over exactly those conversations, interleaved repeats,
   medians of tokens/s; goal: collection >= 0.8 x harvesting. The SAE is a random-direction JumpReLU SAE of
   the given width at a realistic L0 (`apps.interp.random_sae`), since only its cost matters here.
2. judge requests in flight / what could be in flight (the limit, or the requests left when fewer remain;
   `JudgeStats.utilisation`): one
   batch of distinct requests per limit, sent to the fake judge (`apps.interp.fake_judge`) on 127.0.0.1 that
   answers each after a fixed delay (a stand-in for a model server: what is measured is the client, which
   must never idle while requests remain); goal >= 0.9.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apps.interp.fake_judge import FakeAnswer, serve_fake_judge
from apps.interp.judge import Judge, JudgeConfig, JudgeRequest

TARGETS = {"collect_over_harvest": 0.8, "judge_in_flight_over_limit": 0.9}


@dataclass
class BenchInterpConfig:
    """`fast-steer bench interp`."""

    model: str = "default"
    """Model reference."""
    data: tuple[str, ...] = ("../shared/data/chat",)
    """Conversations collected and harvested."""
    conversations: int = 64
    """Conversations read (the same ones for both)."""
    layer: int | None = None
    """The SAE's layer (default: the middle layer)."""
    expansion: int = 8
    """SAE width / model width."""
    l0: float = 64.0
    """Mean L0 the random SAE is set to (what a trained SAE of this width has)."""
    dtype: str = "float32"
    """Model dtype for both."""
    device: str = "auto"
    """Where the model runs."""
    repeats: int = 2
    """Interleaved repeats of collection and harvesting (medians are compared)."""
    judge_requests: int = 64
    """Requests per concurrency limit."""
    judge_concurrency: tuple[int, ...] = (4, 16)
    """Concurrency limits measured."""
    judge_delay_ms: float = 20.0
    """Delay of the fake judge before each answer."""


def run_bench(cfg: BenchInterpConfig) -> dict[str, Any]:
    """Both measurements (see the module docstring), with the targets and whether they are met."""
    collect = collect_vs_harvest(cfg)
    judge = {
        "server": f"apps.interp.fake_judge on 127.0.0.1, {cfg.judge_delay_ms:g} ms per answer",
        "requests": cfg.judge_requests,
        "by_concurrency": {
            str(c): judge_in_flight(c, cfg.judge_requests, cfg.judge_delay_ms / 1000)
            for c in cfg.judge_concurrency
        },
    }
    worst = min(r["in_flight_over_limit"] for r in judge["by_concurrency"].values())
    ratios = {"collect_over_harvest": collect["collect_over_harvest"], "judge_in_flight_over_limit": worst}
    return {
        "config": asdict(cfg),
        "collection": collect,
        "judge": judge,
        **ratios,
        "targets": TARGETS,
        "meets_targets": {name: ratios[name] >= goal for name, goal in TARGETS.items()},
    }


def judge_in_flight(concurrency: int, n_requests: int, delay_s: float) -> dict[str, Any]:
    """Mean requests in flight / `concurrency` while `n_requests` distinct requests are pending."""

    def answer(_body: dict[str, Any]) -> FakeAnswer:
        time.sleep(delay_s)
        return FakeAnswer("[[1]]")

    requests = [JudgeRequest((("user", f"request {i}"),), max_tokens=4) for i in range(n_requests)]
    with tempfile.TemporaryDirectory() as tmp, serve_fake_judge(answer) as server:
        judge = Judge(
            JudgeConfig(
                url=server.url, model="bench", cache_dir=Path(tmp), concurrency=concurrency, top_logprobs=0
            )
        )
        replies = asyncio.run(judge.ask_many(requests))
    stats = judge.stats.as_dict()
    return {
        "concurrency": concurrency,
        "answered": sum(r.text is not None for r in replies),
        "peak_in_flight": stats["peak_in_flight"],
        "mean_in_flight": stats["mean_in_flight"],
        "in_flight_over_limit": stats["utilisation"],
    }


def collect_vs_harvest(cfg: BenchInterpConfig) -> dict[str, Any]:
    """Tokens/s of `collect_examples` and of `write_cache` on the same conversations (interleaved repeats)."""
    import torch

    from apps.interp.random_sae import random_direction_sae
    from hub import load_model, resolve_device
    from hub.sae_io import save_sae
    from steer.sae import SAEConfig, build_sae
    from train.activation_cache import write_cache
    from train.activations import ActivationStream
    from train.config import TrainConfig
    from train.data import load_conversations
    from train.harvest import Harvester
    from train.interp.collect import CollectConfig, collect_examples
    from train.run_config import DataConfig, RunConfig, StreamSettings
    from train.sequences import fast_sequences, make_batch

    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=device)
    layer = cfg.layer if cfg.layer is not None else model.config.get_text_config().num_hidden_layers // 2
    collect_cfg = CollectConfig(instances=cfg.conversations, split="all", model=cfg.model, dtype=cfg.dtype,
                                device=device)  # fmt: skip
    corpus = load_conversations(list(cfg.data), limit=cfg.conversations)
    run = RunConfig(layer=layer, training=TrainConfig(total_tokens=1, batch_size=1), model=cfg.model, device=device,
                    model_dtype=cfg.dtype, data=DataConfig(chat=list(cfg.data)),
                    stream=StreamSettings(max_len=collect_cfg.max_len, token_budget=collect_cfg.token_budget))  # fmt: skip
    d_in = model.config.get_text_config().hidden_size
    harvester = Harvester(model, layer)
    sample = fast_sequences(corpus.items[:8], tokenizer, max_len=collect_cfg.max_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    residuals = torch.cat([r[1:] for r in harvester.per_sequence(make_batch(sample, pad))])  # also a warm-up
    meta = {"hook_name": f"blocks.{layer}.hook_resid_post"}
    template = build_sae(
        SAEConfig(architecture="jumprelu", d_in=d_in, d_sae=d_in * cfg.expansion, metadata=meta)
    )
    sae = random_direction_sae(template, residuals, min(cfg.l0, template.d_sae), seed=0)
    collect_rates, harvest_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_sae(sae.to("cpu"), Path(tmp) / "sae")
        for i in range(cfg.repeats):
            stream = ActivationStream(model, tokenizer, corpus, run)
            t0 = time.perf_counter()
            harvested = write_cache(
                stream, Path(tmp) / f"harvest-{i}", model_source=cfg.model, progress=False
            )
            harvest_rates.append(harvested["tokens"] / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            collection = collect_examples(folder, list(cfg.data), Path(tmp) / f"collect-{i}", collect_cfg,
                                          model=model, tokenizer=tokenizer, progress=False)  # fmt: skip
            collect_rates.append(collection.n_tokens / (time.perf_counter() - t0))
    collect_rate, harvest_rate = statistics.median(collect_rates), statistics.median(harvest_rates)
    stats = collection.manifest["stats"]
    return {
        "model": cfg.model,
        "device": device,
        "layer": layer,
        "sae": f"jumprelu {d_in}x{template.d_sae}, random directions, mean L0 {stats['mean_l0']:.1f}",
        "conversations": stats["conversations"],
        "collection_tokens": collection.n_tokens,
        "harvest_tokens": harvested["tokens"],
        "collect_tokens_per_s": collect_rate,
        "harvest_tokens_per_s": harvest_rate,
        "collect_loop_tokens_per_s": stats["tokens_per_s"],
        "collect_over_harvest": collect_rate / harvest_rate,
        "repeats": cfg.repeats,
    }

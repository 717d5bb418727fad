"""`fast-steer bench train`: FAST harvesting and end-to-end SAE training against the sequential limit.

Measured in one run on the same conversations (JSON on stdout, progress bars on stderr):
1. end-to-end training (`train.pipeline.fit_stream`, the same code as `fast-steer train`) of `--tokens`
   tokens on a freshly opened stream, timed as a whole (SAE set-up, the first buffer fill, initialisation
   and saving included; loading the corpus is timed apart as `data_loading_seconds`);
2. on exactly the forward batches that run harvested: a bare forward to layer L vs FAST harvesting
   (interleaved repeats, medians; padding share);
3. the bare SAE step (the trainer's own step on pre-harvested activations, repeats, median);
4. the sequential limit for the same work: bare forward time of those batches + trained tokens / bare SAE
   step rate; `end_to_end_ratio_to_limit` = that time / the end-to-end time;
5. peak memory of the end-to-end run against model + SAEs + optimiser + buffer + transients;
6. the activation cache: harvesting to disk (`fast-steer harvest`), its read rate, and training from it
   (`train --activations`): the training loop's rate over the bare SAE step (goal >= 0.9);
7. `--vs-saelens`: SAELens 6.54 (in `.venv-saelens`, `make saelens-venv`) on the same model, layer, SAE
   size, batch and token budget, and the ratio of whole-run rates.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hub.formats import CFG_FILE
from steer.errors import FastSteerError

SAELENS_PYTHON = Path(".venv-saelens/bin/python")
SAELENS_SCRIPT = Path(__file__).with_name("saelens_worker.py")


def _sae_step_rate(trainer, xs, repeats: int, bar) -> list[float]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in xs:
            trainer.train_step(x)
            bar.update(len(x))
        rates.append(sum(len(x) for x in xs) / (time.perf_counter() - t0))
    return rates


def run_bench(model_ref: str, data: list[str], layer: int, expansion: int, batch_size: int, tokens: int,
              buffer_tokens: int, repeats: int, autocast: bool, dtype: str, device: str) -> dict:  # fmt: skip
    """All measurements of `fast-steer bench train` (without SAELens)."""
    import torch
    from tqdm.auto import tqdm

    from hub import load_model, resolve_device
    from train.activation_cache import write_cache
    from train.config import SAETrainSpec, TrainConfig
    from train.distributed import DistContext
    from train.harvest import Harvester, harvest_throughput
    from train.memory import peak_memory_mib, reset_peak_memory, resident_memory_mib
    from train.pipeline import fit_stream, open_stream, train
    from train.run_config import DataConfig, RunConfig, StreamSettings
    from train.trainer import SAETrainer

    base_rss = resident_memory_mib() or 0.0
    device = resolve_device(device)
    cfg = TrainConfig(total_tokens=tokens, batch_size=batch_size, saes=[SAETrainSpec(expansion=expansion)],
                      checkpoint_every=0, log_every=10**9, autocast=autocast)  # fmt: skip
    run = RunConfig(layer=layer, training=cfg, model=model_ref, device=device, model_dtype=dtype,
                    data=DataConfig(chat=list(data)), stream=StreamSettings(buffer_tokens=buffer_tokens))  # fmt: skip
    loaded = load_model(model_ref, dtype=dtype, device=device)
    model = loaded.model
    d_in = model.config.get_text_config().hidden_size
    t0 = time.perf_counter()
    stream, source = open_stream(run, DistContext.current(device), loaded)
    loading_seconds = time.perf_counter() - t0
    Harvester(model, layer)(stream.sample_batches(1)[0])  # warm-up: one-off kernel set-up is not throughput
    with tempfile.TemporaryDirectory() as tmp:
        fresh, _ = open_stream(run, DistContext.current(device), loaded)  # the timed run's own stream
        peak_window = reset_peak_memory()  # the training run's peak, not the model loading's
        t0 = time.perf_counter()
        result = fit_stream(run, fresh, source, Path(tmp) / "e2e")
        e2e_seconds = time.perf_counter() - t0
        peak = peak_memory_mib()
        meta = json.loads((Path(tmp) / "e2e" / CFG_FILE).read_text())["metadata"]

        # the very batches the run harvested, in order
        batches = stream.sample_batches(meta["real_tokens"])
        real = sum(b.n_tokens for b in batches)
        with tqdm(total=2 * repeats * real, unit="tok", unit_scale=True, desc="forward vs harvest") as bar:
            fwd = harvest_throughput(model, batches, layer, repeats=repeats, on_tokens=bar.update)
        harvester = Harvester(model, layer)
        acts = torch.cat([harvester(b) for b in batches])
        xs = [acts[i : i + batch_size] for i in range(0, len(acts) - batch_size + 1, batch_size)]
        step_trainer = SAETrainer(
            cfg, d_in, Path(tmp) / "steps", progress=False, dist=DistContext.current(device)
        )
        step_trainer.initialise(xs[0])
        xs = [x.to(device) for x in xs]
        with tqdm(total=repeats * len(xs) * batch_size, unit="tok", unit_scale=True, desc="SAE step") as bar:
            sae_rate = statistics.median(_sae_step_rate(step_trainer, xs, repeats, bar))
        cache = _cache_bench(run, stream, source, Path(tmp), write_cache, train)
    limit_seconds = fwd["bare_seconds"] + result.tokens / sae_rate
    e2e_rate = result.tokens / e2e_seconds
    estimate = _memory_estimate(model, run.stream, d_in, expansion, batch_size, base_rss)
    return {
        "model": model_ref,
        "layer": layer,
        "sae": f"{d_in}x{d_in * expansion}",
        "batch_size": batch_size,
        "buffer_tokens": buffer_tokens,
        "tokens": tokens,
        "device": device,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "sae_autocast_bf16": autocast,
        "forward_batches": len(batches),
        "harvested_tokens": meta["tokens_harvested"],
        "bare_forward_tokens_per_s": fwd["bare_tokens_per_s"],
        "harvest_tokens_per_s": fwd["harvest_tokens_per_s"],
        "harvest_ratio": fwd["ratio"],
        "padding_share": fwd["padding_share"],
        "bare_sae_step_tokens_per_s": sae_rate,
        "sequential_limit_tokens_per_s": result.tokens / limit_seconds,
        "end_to_end_tokens_per_s": e2e_rate,
        "end_to_end_seconds": e2e_seconds,
        "data_loading_seconds": loading_seconds,
        "end_to_end_tokens_trained": result.tokens,
        "end_to_end_ratio_to_limit": limit_seconds / e2e_seconds,
        **cache,
        "cached_training_ratio_to_bare_step": cache["cached_training_loop_tokens_per_s"] / sae_rate,
        "peak_memory_mib": peak,
        "peak_memory_covers": "the end-to-end run" if peak_window else "the whole process",
        "memory_estimate_mib": sum(estimate.values()),
        "memory_estimate_parts_mib": estimate,
        "peak_over_estimate": peak / sum(estimate.values()),
        "repeats": repeats,
    }


def _cache_bench(run, stream, source: str, tmp: Path, write_cache, train) -> dict:
    """Harvest the run's tokens to disk, read them back, and train from them (tokens/s of each)."""
    from dataclasses import replace

    from train.activation_cache import CachedActivationStream

    folder = tmp / "cache"
    t0 = time.perf_counter()
    manifest = write_cache(stream, folder, model_source=source, max_tokens=run.training.final_tokens)
    write_s = time.perf_counter() - t0
    cached = replace(run, data=replace(run.data, activations=str(folder)))
    reader = CachedActivationStream(replace(cached, stream=replace(cached.stream, max_epochs=1)))
    t0 = time.perf_counter()
    read = sum(len(x) for x in reader)
    read_s = time.perf_counter() - t0
    result = train(cached, tmp / "from-cache")
    return {
        "cache_tokens": manifest["tokens"],
        "cache_harvest_tokens_per_s": manifest["tokens"] / write_s,
        "cache_read_tokens_per_s": read / read_s,
        "cached_training_loop_tokens_per_s": result.tokens_per_s,
    }


def _memory_estimate(
    model, stream_cfg, d_in: int, expansion: int, batch_size: int, runtime_mib: float
) -> dict:
    """What a training run must hold (MiB): runtime, model, SAE state, buffer and the largest transients."""
    mib = 2**20
    d_sae = d_in * expansion
    text_cfg = model.config.get_text_config()
    element = next(model.parameters()).element_size()
    return {
        "runtime_baseline": runtime_mib,  # Python, torch and transformers before the model is loaded
        "model": sum(p.numel() * p.element_size() for p in model.parameters()) / mib,
        "saes_params_grads_adam": 4 * (2 * d_sae * d_in + d_sae + d_in) * 4 / mib,
        "buffer": stream_cfg.buffer_tokens * d_in * 4 * 1.5 / mib,  # store + pending refill
        "step_activations": 4 * batch_size * d_sae * 4 / mib,  # feature acts + 3 gradients of [batch, d_sae]
        # one harvesting forward of `token_budget` padded tokens: residual, attention and MLP transients
        "lm_forward": stream_cfg.token_budget * (4 * d_in + 3 * text_cfg.intermediate_size) * element / mib,
    }


def run_saelens(model_dir: Path, data: list[str], layer: int, expansion: int, batch_size: int, tokens: int,
                autocast: bool) -> dict:  # fmt: skip
    """SAELens training throughput in its own venv (a subprocess printing one JSON line)."""
    if not SAELENS_PYTHON.is_file():
        raise FastSteerError(f"{SAELENS_PYTHON} not found: run `make saelens-venv` first")
    cmd = [str(SAELENS_PYTHON), str(SAELENS_SCRIPT), "--model-dir", str(model_dir), "--layer", str(layer),
           "--expansion", str(expansion), "--batch-size", str(batch_size), "--tokens", str(tokens),
           *(["--autocast"] if autocast else []), *[a for d in data for a in ("--data", d)]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise FastSteerError(f"SAELens benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

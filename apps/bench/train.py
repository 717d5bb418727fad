"""`fast-steer bench train`: FAST harvesting and end-to-end SAE training against the sequential limit.

Measured in one run on the same conversations (JSON on stdout, progress bars on stderr):
1. end-to-end training (`train.pipeline.fit_stream`, the same code as `fast-steer train`) of `--tokens`
   tokens on a freshly opened stream, `--repeats` times (medians; the highest peak), each timed as a whole
   (SAE set-up, the first buffer fill, initialisation and saving included; loading the corpus is timed
   apart as `data_loading_seconds`; the pools' token ids are read back from the token cache, which the
   warm-up fills, as in any run after the first over a corpus: `token_cache` counts them), in one setting
   (`--autocast` or not) or, with `--vs-saelens`, in both `SETTINGS`; the top-level figures are the faster's;
2. after each repeat's runs of ours (before SAELens's), on exactly the forward batches a run harvests: the
   bare forward to layer L in every weight dtype / autocast setting at hand (bfloat16 weights, float32
   weights, float32 weights under bfloat16 autocast; compiled, with its compile, `compile_seconds`), one
   pass each (medians over repeats); after all repeats, the bare forward vs FAST harvesting (interleaved
   repeats, medians; padding share);
3. the bare SAE step (the trainer's own step on those activations) in float32 and under bfloat16 autocast,
   one pass each after each repeat's runs of ours (medians over repeats);
4. the sequential limit: the trained tokens' bare forward in its quickest setting for the budget (a compiled
   forward's one-off compile counted), then their SAE steps in the fastest setting (`bare_*_setting` name
   them), from the medians; `end_to_end_ratio_to_limit` is the median over repeats of each repeat's
   best-setting run over the limit of that repeat's own bare measurements (`..._by_repeat`, with both
   sides: `end_to_end_tokens_per_s_by_repeat`, `sequential_limit_tokens_per_s_by_repeat`), so that a
   drift of the machine's speed over the minutes of a benchmark reaches both sides of the ratio alike;
5. peak memory of the end-to-end run against the runtime, model, corpus, SAEs + optimiser, buffer and transients;
6. the activation cache: harvesting to disk (`fast-steer harvest`), its read rate, and training from it
   (`train --activations`): the training loop's rate over the bare SAE step (goal >= 0.9);
7. `--vs-saelens`: SAELens 6.54 (in `.venv-saelens`, `make saelens-venv`) on the same model, layer, SAE
   size, batch and token budget in both settings (float32, and bfloat16 autocast of the LM and the SAE),
   each SAELens run right after ours in the same setting, `--repeats` of each (medians); the best of each
   tool and the ratio of the bests;
8. `--compile`: our harvesting forward `torch.compile`d (`train --compile`), the compile inside each
   end-to-end run (from Inductor's on-disk cache, which the warm-up fills, as in any run after a machine's
   first), the compiled bare forward among the limit's settings, with its compile; SAELens without and with its
   `compile_llm` and `compile_sae`, so that its best is its best either way.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from hub.formats import CFG_FILE

if TYPE_CHECKING:
    from hub import LoadedModel
from steer.errors import FastSteerError

SAELENS_PYTHON = Path(".venv-saelens/bin/python")
SAELENS_SCRIPT = Path(__file__).with_name("saelens_worker.py")


# the two settings of an end-to-end run: the SAE step in float32, or under bfloat16 autocast
SETTINGS = {"float32": False, "autocast": True}


def _setting(autocast: bool, compiled: bool = False) -> str:
    return ("autocast" if autocast else "float32") + (", compiled" if compiled else "")


def _sae_step_rates(trainers: dict, xs, bar) -> dict[str, float]:
    """Tokens/s of each trainer's step over `xs`, one pass each."""
    import torch

    rates = {}
    for name, trainer in trainers.items():
        t0 = time.perf_counter()
        for x in xs:
            trainer.train_step(x, measure=trainer.measures(trainer.step))
            bar.update(len(x))
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        rates[name] = sum(map(len, xs)) / (time.perf_counter() - t0)
    return rates


def _forward_rates(model, model_ref, batches, layer, device, loaded_here: bool,
                   compile: bool) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """Bare-forward tokens/s on `batches` (one pass) in each weight dtype / autocast setting at hand: the
    model's own (and, with `compile`, its compiled layers); where this benchmark loaded it, the other of
    float32 / bfloat16 too; float32 also under bf16 autocast. And the one-off seconds a setting costs before
    its rate (the compile, `compile_seconds`)."""
    import torch

    from hub import load_model
    from train.harvest import bare_forward_rate, compile_seconds

    models = {model.dtype: model}
    if loaded_here:
        other = "float32" if model.dtype == torch.bfloat16 else "bfloat16"
        # loaded for this pass and freed after it: never held through an end-to-end run's peak window
        models[getattr(torch, other)] = load_model(model_ref, dtype=other, device=device).model
    rates, one_off = {}, {}
    for dtype, m in models.items():
        name = str(dtype).removeprefix("torch.")
        rates[f"{name} weights"] = bare_forward_rate(m, batches, layer, 1)
        if compile and m is model:
            rates[f"{name} weights, compiled"] = bare_forward_rate(m, batches, layer, 1, compile=True)
            one_off[f"{name} weights, compiled"] = compile_seconds(m, batches[0], layer)
        if dtype == torch.float32:
            rates[f"{name} weights, bfloat16 autocast"] = bare_forward_rate(m, batches, layer, 1, True)
    return rates, one_off


def _end_to_end(run, loaded, device: str, out: Path, reset_host_peak) -> dict:
    """Time `fit_stream` on a freshly opened stream (the SAE set-up, the first buffer fill, initialisation
    and saving included) and measure its peak memory."""
    import torch

    from train.distributed import DistContext
    from train.memory import peak_memory_mib
    from train.pipeline import fit_stream, open_stream
    from train.trainer import LOG_FILE

    fresh, source = open_stream(run, DistContext.current(device), loaded)
    peak_window = _reset_peak(device, reset_host_peak)  # the training run's peak, not the loading's
    t0 = time.perf_counter()
    result = fit_stream(run, fresh, source, out)
    seconds = time.perf_counter() - t0
    cuda = device.startswith("cuda")
    meta = json.loads((out / CFG_FILE).read_text())["metadata"]
    token_cache = getattr(fresh, "token_cache", None)  # a forward stream's; the warm-up filled it
    last = json.loads((out / LOG_FILE).read_text().splitlines()[-1])
    return {
        "tokens_per_s": result.tokens / seconds,
        "seconds": seconds,
        "tokens_trained": result.tokens,
        "harvested_tokens": meta["tokens_harvested"],
        "real_tokens": meta["real_tokens"],
        "harvest_share": last["data_share"],  # of the loop's time: the stream (harvest, mix) vs the SAE step
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_memory_mib(),
        "peak_window": peak_window,
        # pools whose ids were read back from the token cache / tokenised in the run (None: no cache)
        "token_cache": {"hits": token_cache.hits, "misses": token_cache.misses} if token_cache else None,
    }


def run_bench(model_ref: str, data: list[str], layer: int, expansion: int, batch_size: int, tokens: int,
              buffer_tokens: int, repeats: int, autocast: bool | None, dtype: str, device: str, *,
              loaded: LoadedModel | None = None, with_cache: bool = True,
              vs_saelens: bool = False, compile: bool | None = False) -> dict:  # fmt: skip
    """All measurements of `fast-steer bench train`.

    `loaded`: a model already in memory (the GPU kit's random models of real shapes) instead of loading
    `model_ref` (then only its own dtype is timed for the limit); `with_cache=False` leaves out the
    activation-cache part (it writes every token to disk); `vs_saelens`: end to end in both `SETTINGS` (else
    in `autocast`'s; the top-level figures from the faster), each of our `repeats` runs followed by SAELens's
    in the same setting (medians of each, so a drift of the machine's speed reaches both tools alike);
    `compile`: our harvesting forward compiled (`RunConfig.compile`, None: as `train` decides; each end-to-end
    run compiles afresh, from Inductor's on-disk cache after the warm-up), SAELens without and with
    `compile_llm` and `compile_sae`.
    On CUDA the peak and the estimate are of GPU memory (tensors allocated), elsewhere of host memory.
    """
    from dataclasses import replace

    import torch
    from tqdm.auto import tqdm

    from hub import load_model, resolve_device
    from train.activation_cache import write_cache
    from train.compiled import resolve_compile
    from train.config import SAETrainSpec, TrainConfig
    from train.distributed import DistContext
    from train.harvest import Harvester, harvest_throughput
    from train.memory import object_mib, reset_peak_memory, resident_memory_mib
    from train.pipeline import open_stream, train
    from train.run_config import DataConfig, RunConfig, StreamSettings

    if vs_saelens:  # before anything is loaded or run
        _check_saelens_venv()
        if loaded is not None:
            raise FastSteerError(
                "--vs-saelens runs SAELens on the model's folder: pass a model reference, not a model"
            )
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    compile = resolve_compile(compile, device, tokens)  # as `train` decides
    base_rss = 0.0 if cuda else resident_memory_mib() or 0.0
    cfg = TrainConfig(total_tokens=tokens, batch_size=batch_size, saes=[SAETrainSpec(expansion=expansion)],
                      checkpoint_every=0, log_every=10**9, autocast=autocast)  # fmt: skip
    autocast = cfg.sae_autocast(device)  # None: the trainer's own choice on this device
    run = RunConfig(layer=layer, training=cfg, model=model_ref, device=device, model_dtype=dtype, compile=compile,
                    data=DataConfig(chat=list(data)), stream=StreamSettings(buffer_tokens=buffer_tokens))  # fmt: skip
    loaded_here = loaded is None
    loaded = loaded or load_model(model_ref, dtype=dtype, device=device)
    model = loaded.model
    d_in = model.config.get_text_config().hidden_size
    t0 = time.perf_counter()
    stream, source = open_stream(run, DistContext.current(device), loaded)
    loading_seconds = time.perf_counter() - t0
    trained = cfg.final_tokens
    # the very batches an end-to-end run harvests, in order: the limit's forward runs on the same tokens
    batches = stream.sample_batches(trained)
    Harvester(model, layer, compile=compile)(batches[0])  # warm-up: one-off kernel set-up
    del stream  # each end-to-end run opens its own: no second corpus and buffer held during theirs
    settings = {_setting(ac, compile): ac for ac in (SETTINGS.values() if vs_saelens else [autocast])}
    # SAELens's best is taken over its runs with and without its own compile where ours compiles
    their_compiles = (False, True) if compile else (False,)
    saelens = (
        partial(run_saelens, Path(loaded.source), list(data), layer, expansion, batch_size, tokens)
        if vs_saelens
        else None
    )
    limit_pass = partial(_limit_parts, model, model_ref, batches, layer, device, loaded_here, compile, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        ours: dict[str, list[dict]] = {name: [] for name in settings}
        theirs: dict[str, list[dict]] = {}
        parts: list[dict] = []
        for i in range(repeats):  # interleaved: each setting's run, then SAELens's in the same setting
            for j, (name, ac) in enumerate(settings.items()):
                run_ac = replace(run, training=replace(cfg, autocast=ac))
                if compile:
                    torch.compiler.reset()  # each run compiles, as a new process would (from the disk cache)
                ours[name].append(
                    _end_to_end(run_ac, loaded, device, Path(tmp) / f"run-{i}-{j}", reset_peak_memory)
                )
                if j == len(settings) - 1:  # the limit's parts right after our last run of the repeat (the
                    # autocast one, mostly the best), before SAELens's: minutes nearer the run they measure
                    parts.append(limit_pass(Path(tmp) / f"steps-{i}"))
                for their_compile in their_compiles if saelens else ():
                    theirs.setdefault(_setting(ac, their_compile), []).append(saelens(ac, their_compile))
        e2e = {name: median_run(runs, maxima=("peak_memory_mib",)) for name, runs in ours.items()}
        best = max(e2e, key=lambda name: e2e[name]["tokens_per_s"])
        forward = _medians([p["forward"] for p in parts])
        one_off = _medians([p["one_off"] for p in parts])
        steps = _medians([p["steps"] for p in parts])
        # each repeat's best-setting run over its own limit: a drift of the machine's speed between the runs
        # and the bare measurements reaches both sides of the ratio alike
        limits = [_limit(p, trained)[0] for p in parts]
        ratios = [run["tokens_per_s"] / lim for run, lim in zip(ours[best], limits, strict=True)]
        real = sum(b.n_tokens for b in batches)
        with tqdm(total=2 * repeats * real, unit="tok", unit_scale=True, desc="forward vs harvest") as bar:
            fwd = harvest_throughput(
                model, batches, layer, repeats=repeats, on_tokens=bar.update, compile=compile
            )
        stream, source = open_stream(run, DistContext.current(device), loaded)
        cache = _cache_bench(run, stream, source, Path(tmp), write_cache, train) if with_cache else {}
    limit, fwd_best, step_best = _limit({"forward": forward, "one_off": one_off, "steps": steps}, trained)
    corpus_mib = 0.0 if cuda else object_mib(stream.corpus.items)
    estimate = _memory_estimate(model, run.stream, d_in, expansion, batch_size, base_rss, corpus_mib)
    peak = max(r["peak_memory_mib"] for r in e2e.values())
    out = {
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
        "compile": compile,
        "forward_batches": len(batches),
        "harvested_tokens": e2e[best]["harvested_tokens"],
        "harvest_tokens_per_s": fwd["harvest_tokens_per_s"],
        "harvest_ratio": fwd["ratio"],  # the model's own bare forward over harvesting, same batches
        "padding_share": fwd["padding_share"],
        "bare_forward_tokens_per_s": forward[fwd_best],
        "bare_forward_setting": fwd_best,
        "bare_forward_tokens_per_s_by_setting": forward,
        "bare_forward_one_off_seconds_by_setting": one_off,  # the compile a run pays before the compiled rate
        "bare_sae_step_tokens_per_s": steps[step_best],
        "bare_sae_step_setting": step_best,
        "bare_sae_step_tokens_per_s_by_setting": steps,
        "sequential_limit_tokens_per_s": limit,  # from the medians of the bare rates
        "end_to_end_setting": best,
        "end_to_end_tokens_per_s": e2e[best]["tokens_per_s"],
        "end_to_end_seconds": e2e[best]["seconds"],
        "end_to_end_tokens_trained": trained,
        "end_to_end_harvest_share": e2e[best]["harvest_share"],
        "end_to_end_ratio_to_limit": statistics.median(ratios),
        "end_to_end_ratio_to_limit_by_repeat": ratios,
        "end_to_end_tokens_per_s_by_repeat": [run["tokens_per_s"] for run in ours[best]],
        "sequential_limit_tokens_per_s_by_repeat": limits,
        "end_to_end_by_setting": e2e,
        "data_loading_seconds": loading_seconds,
        **cache,
        **(
            {
                "cached_training_ratio_to_bare_step": cache["cached_training_loop_tokens_per_s"]
                / steps[_setting(autocast)]
            }
            if cache
            else {}
        ),
        "peak_memory_mib": peak,
        "peak_memory_kind": "GPU tensors allocated" if cuda else "host resident",
        "peak_memory_covers": "the end-to-end run"
        if all(r["peak_window"] for r in e2e.values())
        else "the whole process",
        "memory_estimate_mib": sum(estimate.values()),
        "memory_estimate_parts_mib": estimate,
        "peak_over_estimate": peak / sum(estimate.values()),
        "repeats": repeats,
    }
    if vs_saelens:
        out.update(compare_with_saelens(out, {name: median_run(runs) for name, runs in theirs.items()}))
    return out


def median_run(runs: list[dict], maxima: tuple[str, ...] = ()) -> dict:
    """Whole runs of one setting as one: the median of every float that varies between them (the highest of
    `maxima`), a flag only if every run has it, the rest as the runs have it, and `runs`, how many."""
    out = dict(runs[0])
    for key, value in out.items():
        values = [r[key] for r in runs]
        if isinstance(value, bool):
            out[key] = all(values)
        elif isinstance(value, float) and len(set(values)) > 1:
            out[key] = max(values) if key in maxima else statistics.median(values)
    return {**out, "runs": len(runs)}


def _limit_parts(model, model_ref: str, batches, layer: int, device: str, loaded_here: bool, compile: bool,
                 cfg, tmp: Path) -> dict:  # fmt: skip
    """One pass of each part of the sequential limit on the run's `batches`: the bare forward in every
    setting (`_forward_rates`; a compiled one's compile, `compile_seconds`), and the trainer's bare step on
    their activations in each of `SETTINGS`."""
    from dataclasses import replace

    import torch
    from tqdm.auto import tqdm

    from train.distributed import DistContext
    from train.harvest import Harvester
    from train.trainer import SAETrainer

    forward, one_off = _forward_rates(model, model_ref, batches, layer, device, loaded_here, compile)
    harvester = Harvester(model, layer)
    acts = torch.cat([harvester(b) for b in batches])
    size = cfg.batch_size
    xs = [acts[i : i + size].to(device) for i in range(0, len(acts) - size + 1, size)]
    trainers = {}
    for name, ac in SETTINGS.items():
        trainers[name] = SAETrainer(replace(cfg, autocast=ac), harvester.d_in, tmp, progress=False,
                                    dist=DistContext.current(device))  # fmt: skip
        trainers[name].initialise(xs[0])
    with tqdm(total=len(SETTINGS) * len(xs) * size, unit="tok", unit_scale=True, desc="SAE step") as bar:
        steps = _sae_step_rates(trainers, xs, bar)
    return {"forward": forward, "one_off": one_off, "steps": steps}


def _limit(parts: dict, trained: int) -> tuple[float, str, str]:
    """The sequential limit (tokens/s) of `trained` tokens from one set of bare rates: their forward in the
    quickest setting for this budget (a compiled one pays its compile), then their steps in the fastest
    setting; and the two settings' names."""
    seconds = {
        name: trained / rate + parts["one_off"].get(name, 0.0) for name, rate in parts["forward"].items()
    }
    fwd_best = min(seconds, key=seconds.get)
    step_best = max(parts["steps"], key=parts["steps"].get)
    return trained / (seconds[fwd_best] + trained / parts["steps"][step_best]), fwd_best, step_best


def _medians(passes: list[dict[str, float]]) -> dict[str, float]:
    """Each key's median over the passes."""
    return {key: statistics.median(p[key] for p in passes) for key in passes[0]}


def compare_with_saelens(out: dict, saelens: dict[str, dict]) -> dict:
    """SAELens's runs by setting, the best of each tool and the ratio of the bests (whole runs each)."""
    theirs = max(saelens, key=lambda name: saelens[name]["tokens_per_s"])
    ours = out["end_to_end_by_setting"]
    return {
        "saelens": saelens,
        "saelens_best_setting": theirs,
        "saelens_best_tokens_per_s": saelens[theirs]["tokens_per_s"],
        "end_to_end_over_saelens_by_setting": {
            name: ours[name]["tokens_per_s"] / saelens[name]["tokens_per_s"] for name in ours.keys() & saelens
        },
        "end_to_end_over_saelens": out["end_to_end_tokens_per_s"] / saelens[theirs]["tokens_per_s"],
    }


def _reset_peak(device: str, reset_host_peak) -> bool:
    """Start the peak-memory window of `device` (CUDA: the allocator's peak); False where unsupported."""
    import torch

    if not device.startswith("cuda"):
        from train.memory import release_free_memory

        release_free_memory()  # the window starts from what is held, not from pages the bench freed before it
        return reset_host_peak()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return True


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
    model, stream_cfg, d_in: int, expansion: int, batch_size: int, runtime_mib: float, corpus_mib: float
) -> dict:
    """What a training run must hold (MiB): runtime, model, the corpus, SAE state, buffer and the largest
    transients."""
    mib = 2**20
    d_sae = d_in * expansion
    text_cfg = model.config.get_text_config()
    element = next(model.parameters()).element_size()
    return {
        "runtime_baseline": runtime_mib,  # host: Python, torch and transformers before the model; CUDA: 0
        "model": sum(p.numel() * p.element_size() for p in model.parameters()) / mib,
        # host: the loaded records, which the stream reads again every epoch (Python objects; CUDA: 0)
        "corpus": corpus_mib,
        "saes_params_grads_adam": 4 * (2 * d_sae * d_in + d_sae + d_in) * 4 / mib,
        "buffer": stream_cfg.buffer_tokens * d_in * 4 * 1.5 / mib,  # store + pending refill
        "step_activations": 4 * batch_size * d_sae * 4 / mib,  # feature acts + 3 gradients of [batch, d_sae]
        # one harvesting forward of `token_budget` padded tokens: residual, attention and MLP transients
        "lm_forward": stream_cfg.token_budget * (4 * d_in + 3 * text_cfg.intermediate_size) * element / mib,
    }


def _check_saelens_venv() -> None:
    if not SAELENS_PYTHON.is_file():
        raise FastSteerError(f"{SAELENS_PYTHON} not found: run `make saelens-venv` first")


def run_saelens(model_dir: Path, data: list[str], layer: int, expansion: int, batch_size: int, tokens: int,
                autocast: bool, compile: bool = False) -> dict:  # fmt: skip
    """SAELens training throughput in its own venv (a subprocess printing one JSON line); `compile`: with
    its `compile_llm` and `compile_sae`."""
    _check_saelens_venv()
    cmd = [str(SAELENS_PYTHON), str(SAELENS_SCRIPT), "--model-dir", str(model_dir), "--layer", str(layer),
           "--expansion", str(expansion), "--batch-size", str(batch_size), "--tokens", str(tokens),
           *(["--autocast"] if autocast else []), *(["--compile"] if compile else []),
           *[a for d in data for a in ("--data", d)]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise FastSteerError(f"SAELens benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

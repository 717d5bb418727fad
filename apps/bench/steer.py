"""`fast-steer bench steer`: tokens/s of plain HF generate vs steered generate, measured in one run.

Cases (random SAEs of the requested width, on the default model unless told otherwise):
- `special_add`: `add` of two decoder directions at special positions (no encoder);
- `few_feature`: scale / set / ablate of three features of a ReLU SAE at every position (three encoder columns);
- `full_sae_all`: the same edit on a TopK SAE at every position (the full encoder runs on every token).
Runs are interleaved (the case order rotates each repeat). Two figures per case:
- `ratio` (the one checked against the targets): the median over repeats of plain / steered median time of
  a decode step within the same repeat. A decode step is one forward of the model, timed by hooks on the whole
  model, so the steering hooks' own work is inside it. Medians of steps shrug off single slow steps and the
  pairing within a repeat cancels slow phases of the machine, so a 1% difference stands out of its noise;
- `generate_ratio`: the median over repeats of plain / steered wall time of the whole `generate` call of the
  same repeat (prefill and sampling included; noisier, a few % on a shared CPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from apps.bench.config import ModelBenchConfig

if TYPE_CHECKING:
    from hub import LoadedModel

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for learning to cook.",
    "What is 17 times 23?",
    "Name a famous painting and its painter.",
    "How do vaccines work?",
    "Suggest a name for a small bakery.",
)
TARGETS = {"special_add": 0.99, "few_feature": 0.99, "full_sae_all": 0.97}


@dataclass
class BenchConfig(ModelBenchConfig):
    """`fast-steer bench steer`."""

    topk: int = 64
    """k of the TopK SAE (the full-SAE case)."""
    new_tokens: int = 16
    """New tokens per `generate` (the first forward is the prefill)."""
    repeats: int = 20
    """Interleaved repeats (a warm-up repeat runs first, unrecorded)."""
    batch_sizes: tuple[int, ...] = (1, 8)
    """Prompts per batch, one measurement each."""


def build_cases(sm, layer: int, d_sae: int, topk: int) -> dict:
    """The steered cases: name -> list of Interventions (random SAEs, fixed seed)."""
    import torch

    from steer import Edit, Intervention, SAEConfig, build_sae

    torch.manual_seed(0)
    relu = build_sae(SAEConfig("standard", sm.d_model, d_sae, device=str(sm.device)))
    top = build_sae(SAEConfig("topk", sm.d_model, d_sae, k=topk, device=str(sm.device)))
    latent = [Edit(11, "scale", 2.0), Edit(22, "set", 1.0), Edit(33, "ablate")]
    return {
        "special_add": [Intervention(layer, relu, [Edit(1, "add", 8.0), Edit(2, "add", -4.0)], "special")],
        "few_feature": [Intervention(layer, relu, latent, "all")],
        "full_sae_all": [Intervention(layer, top, latent, "all")],
    }


def run_bench(cfg: BenchConfig, loaded: LoadedModel | None = None) -> dict:
    """Plain vs steered decode on `cfg.model`, or on `loaded` (a model already in memory) when given."""
    import torch
    from tqdm import tqdm

    from hub import load_model, resolve_device
    from steer import SteeredModel
    from steer.positions import pad_token_id

    device = resolve_device(cfg.device)  # again: `bench all` invokes commands without option callbacks
    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype, device=device)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    sm = SteeredModel(loaded.model, tokenizer)
    layer = sm.n_layers // 2 if cfg.layer is None else cfg.layer
    cases = build_cases(sm, layer, cfg.d_sae, cfg.topk)
    names = ["plain", *cases]

    def sync() -> None:  # CUDA runs asynchronously: time finished work only
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def generate(batch: dict, specs) -> float:
        sync()
        start = time.perf_counter()
        with torch.inference_mode(), sm.steer(specs):
            sm.generate(
                **batch,
                max_new_tokens=cfg.new_tokens,
                min_new_tokens=cfg.new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id(tokenizer),
            )
        sync()
        return time.perf_counter() - start

    step_times: list[float] = []

    def start_step(module, args, kwargs) -> None:
        sync()
        step_times.append(time.perf_counter())

    def end_step(module, args, kwargs, output) -> None:
        sync()
        step_times[-1] = time.perf_counter() - step_times[-1]

    timers = [
        loaded.model.register_forward_pre_hook(start_step, with_kwargs=True),
        loaded.model.register_forward_hook(end_step, with_kwargs=True),
    ]
    results = {}
    total = len(cfg.batch_sizes) * (cfg.repeats + 1) * len(names)
    try:
        with tqdm(total=total, desc="bench steer", unit="run") as bar:
            for batch_size in cfg.batch_sizes:
                batch = _prompt_batch(tokenizer, batch_size, device)
                runs: dict[str, list[float]] = {name: [] for name in names}
                steps: dict[str, list[list[float]]] = {name: [] for name in names}
                for repeat in range(cfg.repeats + 1):  # repeat 0 warms up and is not recorded
                    shift = repeat % len(names)
                    for name in names[shift:] + names[:shift]:
                        step_times.clear()
                        elapsed = generate(batch, None if name == "plain" else cases[name])
                        if repeat:
                            runs[name].append(elapsed)
                            steps[name].append(step_times[1:])  # the first forward is the prefill
                        bar.update()
                results[f"batch_{batch_size}"] = _summarise(runs, steps, batch_size, cfg.new_tokens)
    finally:
        for timer in timers:
            timer.remove()
    return {
        "config": {**asdict(cfg), "device": device, "layer": layer, "model_source": loaded.source},
        "results": results,
        "targets": TARGETS,
        "meets_targets": {
            key: {name: res[name]["ratio"] >= target for name, target in TARGETS.items()}
            for key, res in results.items()
        },
    }


def _prompt_batch(tokenizer, batch_size: int, device: str) -> dict:
    conversations = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch_size)]
    texts = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def _summarise(
    runs: dict[str, list[float]], steps: dict[str, list[list[float]]], batch_size: int, new_tokens: int
) -> dict:
    """Per case: decode-step and whole-generate tokens/s and their paired ratios to plain (medians)."""
    plain_steps = [statistics.median(r) for r in steps["plain"]]
    out = {}
    for name, times in runs.items():
        case_steps = [statistics.median(r) for r in steps[name]]
        out[name] = {
            "decode_tokens_per_s": batch_size / statistics.median(x for r in steps[name] for x in r),
            "generate_tokens_per_s": batch_size * new_tokens / statistics.median(times),
            "decode_steps": sum(map(len, steps[name])),
            "generate_seconds": [round(t, 4) for t in times],
        }
        if name != "plain":
            out[name] |= {
                "ratio": statistics.median(p / s for p, s in zip(plain_steps, case_steps, strict=True)),
                "generate_ratio": statistics.median(p / s for p, s in zip(runs["plain"], times, strict=True)),
            }
    return out

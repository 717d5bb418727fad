"""The main job (`fast-steer run`): train (or reuse) a FAST SAE on the default model, evaluate it,
discover its special-token features, and open the demo with them preselected.

Training goes through `train.pipeline` like every other command; the job only adds its cache:
everything it computes is kept under `<cache>/main-job/<key>/`, where the key hashes the run config
(model, data, layer, tokens, architecture, width, seed, stream settings; not the device) and the
model's identity. A second run with the same settings reuses the SAE, its evaluation and its feature
table, and a killed run resumes from the trainer's last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apps.demo.backend import DemoBackend, DemoSAE
from apps.demo.edits import EditRow
from apps.demo.settings import DemoLimits
from hub.cache import cache_dir, hub_reachable
from steer.errors import ConfigError, MissingFileError
from train.data import shared_data_dir
from train.feature_table import FEATURES_FILE, TopFeature, read_top_features, save_top_features, top_features

HUB_CHAT_DATASET = "HuggingFaceTB/everyday-conversations-llama3.1-2k:train_sft"
CACHE_VERSION = 3


@dataclass
class MainJobConfig:
    """Settings of the main job; the defaults train a useful SAE on a 2-core CPU in a few minutes."""

    model: str = "default"
    device: str = "auto"
    data: str | None = None  # None: the shared chat data, else a Hub dataset when reachable
    layer: int = 15
    tokens: int = 400_000
    # jumprelu, not standard: lower held-out Δ LM loss at fixed coefficients and along the Δ LM loss-L0 frontier
    # in the study (docs/results.md, "main job recipe"); at this job's own 400k tokens, +11.8% LM loss (L0 99)
    # against +39% for the standard SAE (L0 73), on the 48 held-out conversations the job evaluates on
    # (2026-12-06, bf16 autocast of the SAE step; README, Speed)
    arch: str = "jumprelu"
    expansion: int = 8
    batch_size: int = 1024
    seed: int = 42
    exclude_first_token: bool = True  # its residual norm is ~100x the rest on SmolLM2; recorded in metadata
    eval_conversations: int = 48
    feature_conversations: int = 48
    sample_conversations: int = 16
    features_per_token: int = 5
    preselect: int = 1  # top features preselected in the demo (0 = none)
    preselect_strength: float = 200.0  # their `add` strength s on the study's scale (s/100 x the layer's R)
    cache: Path | None = None  # None: <fast-steer cache>/main-job

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ConfigError(f"layer must be >= 0, got {self.layer}")
        if self.tokens < self.batch_size:
            raise ConfigError(f"tokens must be at least one batch ({self.batch_size}), got {self.tokens}")
        for name in (
            "eval_conversations",
            "feature_conversations",
            "sample_conversations",
            "features_per_token",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.preselect < 0:
            raise ConfigError(f"preselect must be >= 0, got {self.preselect}")
        if not 0 <= self.preselect_strength <= DemoLimits().max_strength():
            raise ConfigError(
                f"preselect_strength must be between 0 and {DemoLimits().max_strength():g} (the demo's limit), "
                f"got {self.preselect_strength}"
            )


@dataclass
class MainJobResult:
    """What the job produced: the SAE folder, its evaluation metrics, the feature table, what was reused."""

    sae_dir: Path
    metrics: dict[str, float]
    features: list[TopFeature]
    reused_sae: bool
    seconds: float


def resolve_data(data: str | None) -> str:
    """`data` when given; else the shared chat folder; else the Hub dataset when the Hub is reachable."""
    if data:
        return data
    try:
        return str(shared_data_dir("chat"))
    except MissingFileError as missing:
        ok, why = hub_reachable()
        if ok:
            return HUB_CHAT_DATASET
        raise MissingFileError(
            f"{missing}; the Hub is not reachable either ({why}); pass --data PATH"
        ) from None


def run_config(cfg: MainJobConfig, data: str):
    """The pipeline's `RunConfig` for the job: the default preset, FAST on `data`."""
    from train.config import SAETrainSpec, preset_config
    from train.run_config import DataConfig, RunConfig, StreamSettings

    training = preset_config(
        "default",
        total_tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        saes=[SAETrainSpec(arch=cfg.arch, expansion=cfg.expansion)],
    )
    return RunConfig(
        layer=cfg.layer,
        training=training,
        model=cfg.model,
        device=cfg.device,
        data=DataConfig(chat=[data]),
        stream=StreamSettings(buffer_tokens=buffer_tokens(cfg), exclude_first_token=cfg.exclude_first_token),
    )


def job_dir(cfg: MainJobConfig, run, model_source: str) -> Path:
    """The cache folder of the SAE `run` trains (evaluation and features are cached beside it)."""
    settings = {k: v for k, v in run.to_dict().items() if k != "device"}
    settings.update(model_source=model_source, version=CACHE_VERSION)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = cfg.cache or cache_dir() / "main-job"
    return root / f"L{cfg.layer}-{cfg.arch}-x{cfg.expansion}-{cfg.tokens // 1000}k-{key}"


def buffer_tokens(cfg: MainJobConfig) -> int:
    """Mixing-buffer size: 65,536 tokens, smaller for tiny budgets (never below two batches)."""
    return max(2 * cfg.batch_size, min(65_536, cfg.tokens))


def spread(items: list, n: int) -> list:
    """`n` items evenly spaced over `items` (all of them when there are fewer), in order."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def run_main_job(
    cfg: MainJobConfig, echo: Callable[[str], None] = print
) -> tuple[MainJobResult, DemoSAE, list]:
    """Train or reuse the SAE, print its evaluation and top features; returns the result, the SAE for
    the demo (on the float32 model's device) and the held-out sample conversations."""
    from hub import load_model, load_sae, resolve_device
    from train.data import load_conversations
    from train.evaluate import EVAL_FILE, EvalConfig, EvalResult, evaluate_sae, format_table, write_eval
    from train.features import discover_features
    from train.pipeline import train
    from train.trainer import CKPT_DIR, finished_run

    start = time.perf_counter()
    data = resolve_data(cfg.data)
    run = run_config(cfg, data)
    device = resolve_device(cfg.device)
    model, tok = loaded = load_model(cfg.model, dtype=run.model_dtype, device=device)
    dtype = str(model.dtype).removeprefix("torch.")
    echo(f"[1/5] model {cfg.model!r} ({dtype} on {device} for harvesting) and data {data}")
    n_layers = model.config.get_text_config().num_hidden_layers
    if cfg.layer >= n_layers:
        raise ConfigError(f"--layer {cfg.layer} is out of range: the model has layers 0..{n_layers - 1}")
    out = job_dir(cfg, run, load_model_source(cfg.model, model))
    held_out = load_conversations(data, split="held_out").items

    reused = finished_run(out)
    if reused:
        echo(f"[2/5] reusing the SAE trained earlier: {out}")
    else:
        echo(
            f"[2/5] training a FAST {cfg.arch} SAE (x{cfg.expansion}) at layer {cfg.layer} on {cfg.tokens:,} tokens -> {out}"
        )
        train(run, out, loaded=loaded, resume=(out / CKPT_DIR).is_dir(), created_by="fast-steer run")
    sae = load_sae(out, device=device)

    eval_path = out / EVAL_FILE
    if eval_path.is_file():
        echo(f"[3/5] evaluation (cached in {eval_path})")
        stored = json.loads(eval_path.read_text())
        result = EvalResult.from_dict(stored)
    else:
        echo(f"[3/5] evaluating on {cfg.eval_conversations} held-out conversations")
        result = evaluate_sae(
            sae, model, tok, spread(held_out, cfg.eval_conversations), cfg.layer, EvalConfig()
        )
        write_eval(result, eval_path)
    echo(format_table(result))

    features_path = out / FEATURES_FILE
    if features_path.is_file():
        echo(f"[4/5] top special-token features (cached in {features_path})")
        features = read_top_features(features_path)
    else:
        echo(
            f"[4/5] discovering special-token features on {cfg.feature_conversations} held-out conversations"
        )
        report = discover_features(
            model,
            tok,
            sae,
            cfg.layer,
            spread(held_out, cfg.feature_conversations),
            top_k=cfg.features_per_token,
        )
        features = top_features(report, cfg.features_per_token)
        save_top_features(features, features_path)
    echo(format_features(features))
    del model
    demo_sae = DemoSAE(name=out.name, sae=sae, top_features=features)
    job = MainJobResult(
        sae_dir=out,
        metrics=result.metrics,
        features=features,
        reused_sae=reused,
        seconds=time.perf_counter() - start,
    )
    return job, demo_sae, spread(held_out, cfg.sample_conversations)


def build_main_backend(cfg: MainJobConfig, demo_sae: DemoSAE, sample: list, limits: DemoLimits | None = None):
    """The demo backend of the main job: the float32 model, its SAE, and the strongest special-token
    features preselected as `add` edits at special positions of strength `cfg.preselect_strength` (the
    study's scale)."""
    from hub import load_model

    model, tok = load_model(cfg.model, device=cfg.device)
    backend = DemoBackend(
        model, tok, [demo_sae], model_ref=cfg.model, limits=limits, sample_conversations=sample
    )
    rows = preselected_edits(demo_sae.top_features, cfg.preselect, cfg.preselect_strength)
    backend.preselect = backend.check_rows(None, rows)
    return backend


def load_model_source(ref: str, model) -> str:
    """A stable identity of the model for the cache key: its reference and its config."""
    return json.dumps({"ref": ref, "config": model.config.to_diff_dict()}, sort_keys=True, default=str)


def format_features(features: list[TopFeature]) -> str:
    """The feature table as text: one line per (token, feature, mean max activation)."""
    lines = [f"{'token':>16}  {'feature':>7}  mean max act"]
    lines += [f"{f.token!r:>16}  {f.feature:>7}  {f.mean_max:>12.4f}" for f in features]
    return "\n".join(lines)


def preselected_edits(features: list[TopFeature], n: int, strength: float) -> list[EditRow]:
    """`add` edits at special positions for the `n` strongest distinct features of the table."""
    ranked = sorted(features, key=lambda f: -f.mean_max)
    chosen: list[int] = []
    for f in ranked:
        if f.feature not in chosen:
            chosen.append(f.feature)
        if len(chosen) == n:
            break
    return [EditRow(k, "add", round(strength, 1), "special") for k in chosen]

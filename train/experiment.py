"""`reproduce`: FAST vs BT(F) vs BT(P) SAEs with identical settings, evaluated on the same held-out chats.

Each method's activations are harvested once into a cache; every SAE trains from it. Two views:
- the paper's: one fixed sparsity coefficient per architecture (`l1_coefficient`, `l0_coefficient`), in
  every training variant (`all`: every token, as in the paper; `no-first`: position 0 left out);
- an L0-matched one: the first variant also trains the `l1_grid` / `l0_grid` coefficients, so that the
  methods can be compared on the MSE-L0 and Δ LM loss-L0 frontiers (`train.results_table`).

Layout of the output folder (re-running reuses finished runs and resumes unfinished ones):

    OUT/experiment.json                    the settings (a rerun with other settings is refused), with
                                           paths relative to OUT and data by content hash, so that OUT
                                           can move (`train.experiment_record`)
    OUT/heldout.jsonl                      the held-out conversations every SAE is evaluated on
    OUT/activation_scale.json              the one activation scale of every run (normalising presets)
    OUT/cache/<method>/                    the method's harvested activations (`fast-steer harvest` format)
    OUT/runs/<method>/<variant>/           one trainer run: every SAE of the variant on one cached stream
    OUT/runs/<method>/<variant>/<sae>/     an SAE folder (cfg.json + sae_weights.safetensors) + eval.json
    OUT/runs/<method>/<variant>/timing.json  wall seconds spent training / evaluating (summed over resumes)
    OUT/results.{json,md}, frontier.png    the tables and plots

A run is finished when every SAE folder of it has its weights and `eval.json`.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hub import resolve_device, resolve_dtype
from hub.formats import CFG_FILE, WEIGHTS_FILE
from steer.errors import ConfigError, MissingFileError
from steer.sae import dtype_name
from train.activation_cache import (
    MANIFEST,
    check_harvest_dtype,
    harvest_dtype,
    harvest_summary,
    read_manifest,
)
from train.config import SAETrainSpec, TrainConfig, preset_config
from train.data import shared_data_dir
from train.experiment_record import (
    DATA_FIELDS,
    FORMAT_VERSION,
    config_values,
    data_ref,
    differences,
    read_record,
    write_record,
)
from train.results_table import ResultRow, check_metrics, mean_gsnr, write_results
from train.sequences import METHOD_LABELS, METHODS

log = logging.getLogger(__name__)

ARCHS = ("standard", "jumprelu")
# training variant -> exclude_first_token
VARIANTS = {"all": False, "no-first": True}
DEFAULT_TOKENS = 1_500_000
EVAL_FILE = "eval.json"
TIMING_FILE = "timing.json"
HELDOUT_FILE = "heldout.jsonl"
SCALE_FILE = "activation_scale.json"


@dataclass
class ReproduceConfig:
    """Settings of a reproduce run; the same for every method so that only the data differs."""

    out: Path
    model: str = "default"
    layer: int = 15
    tokens: int = DEFAULT_TOKENS
    chat_data: list[str] = field(default_factory=lambda: [str(shared_data_dir("chat"))])
    pretrain_data: list[str] = field(default_factory=lambda: [str(shared_data_dir("pretrain"))])
    methods: tuple[str, ...] = METHODS
    archs: tuple[str, ...] = ARCHS
    expansion: int = 8
    preset: str = "default"
    batch_size: int | None = None  # tokens per step; None = the preset's
    l1_coefficient: float | None = None  # standard SAEs (the paper's view); None = the preset's
    l0_coefficient: float | None = None  # jumprelu SAEs (the paper's view); None = the preset's
    l1_grid: tuple[float, ...] = ()  # more L1 coefficients, trained in the first variant (frontier)
    l0_grid: tuple[float, ...] = ()  # more L0 coefficients, trained in the first variant (frontier)
    # more jumprelu initial thresholds (at the fixed L0 coefficient), trained in the first variant: on CPU
    # budgets the threshold moves little from its start, so the start is what spreads jumprelu's L0
    threshold_grid: tuple[float, ...] = ()
    variants: tuple[str, ...] = ("all",)  # keys of VARIANTS; the first one carries the grids
    buffer_tokens: int = 65536  # mixing buffer (at least 2 x batch size)
    max_len: int = 8192  # FAST truncation of a conversation
    # harvesting dtype; auto: the one OUT already records (experiment.json, caches), else hub.resolve_dtype's for
    # the device, resolved at the first harvest and recorded (the SAEs train in float32)
    model_dtype: str = "auto"
    cache_dtype: str = "bfloat16"  # dtype of the harvested activations on disk
    autocast: bool = False  # bf16 autocast of the SAE matmuls (~3x faster on CPUs with AMX)
    gsnr_every: int = 0  # steps between GSNR measurements (a multiple of the preset's log_every; 0: off)
    device: str = "auto"
    eval_conversations: int = 200
    held_out_fraction: float = 0.05
    seed: int = 42

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser()
        self.methods, self.archs, self.variants = tuple(self.methods), tuple(self.archs), tuple(self.variants)
        self.l1_grid, self.l0_grid = tuple(self.l1_grid), tuple(self.l0_grid)
        self.threshold_grid = tuple(self.threshold_grid)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(
                f"methods must be a non-empty subset of {', '.join(METHODS)}; got {list(self.methods)}"
            )
        if not self.archs:
            raise ConfigError("at least one SAE architecture is needed")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants or len(set(self.variants)) != len(self.variants):
            raise ConfigError(
                f"variants must be distinct values of {', '.join(VARIANTS)}; got {list(self.variants)}"
            )
        if self.tokens <= 0 or self.eval_conversations <= 0:
            raise ConfigError(
                f"tokens and eval_conversations must be positive (got {self.tokens}, {self.eval_conversations})"
            )
        for variant in self.variants:
            self.train_config(variant)  # validates the architectures, expansion, grids and preset

    def base_config(self) -> TrainConfig:
        """The preset with this experiment's overrides (its coefficients are the paper view's)."""
        return preset_config(
            self.preset,
            total_tokens=self.tokens,
            batch_size=self.batch_size,
            l1_coefficient=self.l1_coefficient,
            l0_coefficient=self.l0_coefficient,
            gsnr_every=self.gsnr_every or None,
            autocast=self.autocast,
            seed=self.seed,
        )

    def specs(self, arch: str, variant: str) -> list[SAETrainSpec]:
        """The SAEs `variant` trains for `arch`: first the fixed (paper-view) one, then, in the first
        variant only, the frontier's: each other grid coefficient, and for jumprelu each other initial
        threshold (at the fixed coefficient)."""
        base = self.base_config()
        fixed_coefficient = {"standard": base.l1_coefficient, "jumprelu": base.l0_coefficient}.get(arch)
        fixed = SAETrainSpec(arch=arch, expansion=self.expansion, sparsity_coefficient=fixed_coefficient)
        if variant != self.variants[0] or fixed_coefficient is None:
            return [fixed]
        grid = {"standard": self.l1_grid, "jumprelu": self.l0_grid}[arch]
        out = [fixed, *(replace(fixed, sparsity_coefficient=c) for c in grid if c != fixed_coefficient)]
        if arch == "jumprelu":
            out += [
                replace(fixed, jumprelu_init_threshold=t)
                for t in self.threshold_grid
                if t != base.jumprelu_init_threshold
            ]
        return out

    def paper_view_indices(self, variant: str) -> list[int]:
        """Where each architecture's fixed-coefficient (paper-view) SAE sits among `variant`'s SAEs."""
        starts, offset = [], 0
        for arch in self.archs:
            starts.append(offset)
            offset += len(self.specs(arch, variant))
        return starts

    def train_config(self, variant: str) -> TrainConfig:
        """The `TrainConfig` of one variant: the same for every method."""
        specs = [spec for arch in self.archs for spec in self.specs(arch, variant)]
        return replace(self.base_config(), saes=specs)

    @property
    def cache_tokens(self) -> int:
        """Tokens harvested per method: the budget, plus room for the tokens a variant leaves out."""
        return self.tokens + self.tokens // 50 + self.buffer_tokens

    def cache_dir(self, method: str) -> Path:
        return self.out / "cache" / method

    def run_config(self, method: str, variant: str | None = None, norm_scaling_factor: float | None = None):
        """The pipeline's `RunConfig` of one method: identical settings, only the data differs. With a
        `variant`, it trains from the method's cache; without, it harvests from the model."""
        from train.run_config import DataConfig, RunConfig, StreamSettings

        training = self.train_config(variant or self.variants[0])
        if norm_scaling_factor is not None:
            training = replace(training, norm_scaling_factor=norm_scaling_factor)
        return RunConfig(
            layer=self.layer,
            training=training,
            model=self.model,
            device=self.device,
            model_dtype=self.model_dtype,
            data=DataConfig(
                method=method,
                chat=list(self.chat_data),
                pretrain=list(self.pretrain_data),
                held_out_fraction=self.held_out_fraction,
                seed=self.seed,
                activations=None if variant is None else str(self.cache_dir(method)),
            ),
            stream=StreamSettings(
                buffer_tokens=self.buffer_tokens,
                max_len=self.max_len,
                exclude_first_token=VARIANTS[variant] if variant else False,
            ),
        )

    def data_refs(self) -> dict[str, list[dict[str, str]]]:
        """Each data source as experiment.json records it: its path and content hash (`data_ref`)."""
        refs = {}
        for name, (kind, label) in DATA_FIELDS.items():
            paths = getattr(self, name)
            missing = [p for p in paths if not Path(p).expanduser().exists()]
            if missing:
                raise MissingFileError(f"{label} not found: {', '.join(missing)}")
            refs[name] = [data_ref(p, self.out, kind) for p in paths]
        return refs

    def settings(self) -> dict[str, Any]:
        """What must match for a rerun to reuse this folder's runs, as experiment.json records it (version
        `FORMAT_VERSION`: no path of the folder itself, data by path and hash, the dtype resolved)."""
        if self.model_dtype == "auto":
            raise ValueError("resolve the model dtype first (resolve_model_dtype)")
        out = {"format_version": FORMAT_VERSION, **asdict(self), **self.data_refs()}
        out.pop("out")  # the folder is wherever experiment.json is
        out.pop("device")  # where it runs does not change what it computes
        for key in ("methods", "archs", "variants", "l1_grid", "l0_grid", "threshold_grid"):
            out[key] = list(getattr(self, key))
        # the resolved optimisation settings, so that a changed preset is noticed instead of retraining
        out["train_config"] = {
            v: json.loads(json.dumps(self.train_config(v).to_dict())) for v in self.variants
        }
        return out


@dataclass
class RunStatus:
    """One (method, variant) trainer run: where it lives and what is already done."""

    method: str
    variant: str
    run_dir: Path
    sae_dirs: list[Path]

    @property
    def trained(self) -> bool:
        return all(_has_weights(d) for d in self.sae_dirs)

    @property
    def finished(self) -> bool:
        return all(_has_weights(d) and (d / EVAL_FILE).is_file() for d in self.sae_dirs)


def _has_weights(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def plan_runs(cfg: ReproduceConfig) -> list[RunStatus]:
    """The runs of `cfg`, one per method and variant, with their SAE folders (named as the trainer names them)."""
    runs = []
    for method in cfg.methods:
        for variant in cfg.variants:
            names = [spec.name for spec in cfg.train_config(variant).resolved_specs()]
            run_dir = cfg.out / "runs" / method / variant
            dirs = [run_dir / name for name in names] if len(names) > 1 else [run_dir]
            runs.append(RunStatus(method, variant, run_dir, dirs))
    return runs


def check_settings(cfg: ReproduceConfig) -> None:
    """Record the settings in OUT/experiment.json, or refuse if the folder holds runs with other settings
    (an older experiment.json whose settings match is rewritten in the current format)."""
    mine = cfg.settings()
    saved = read_record(cfg.out)
    if saved is not None:
        diff = differences(saved, mine, cfg.out)
        if diff:
            raise ConfigError(
                f"{cfg.out} holds an experiment with other settings ({'; '.join(diff)}); use another --out"
            )
        if saved.get("format_version") == FORMAT_VERSION:
            return
        log.info("%s: experiment.json upgraded to format version %d", cfg.out, FORMAT_VERSION)
    write_record(cfg.out, mine)


def resolve_model_dtype(cfg: ReproduceConfig, model: PreTrainedModel | None = None) -> ReproduceConfig:
    """`cfg` with the model dtype it harvests in, resolved: an explicit one as given; `auto`: the one OUT
    records (experiment.json, else its caches), else `model`'s, else `hub.resolve_dtype` for the device.
    OUT's caches must all be of that dtype (`check_harvest_dtype`), and so must `model`."""
    cached = {
        method: read_manifest(cfg.cache_dir(method))
        for method in cfg.methods
        if (cfg.cache_dir(method) / MANIFEST).is_file()
    }
    dtype = cfg.model_dtype
    if dtype == "auto":
        recorded = (read_record(cfg.out) or {}).get("model_dtype", "auto")
        harvested = [d for d in map(harvest_dtype, cached.values()) if d]
        if recorded != "auto":
            dtype = recorded
        elif harvested:
            dtype = harvested[0]
        elif model is not None:
            dtype = dtype_name(model.dtype)
    dtype = resolve_dtype(dtype, resolve_device(cfg.device) if dtype == "auto" else "cpu")
    for method, manifest in cached.items():
        check_harvest_dtype(cfg.cache_dir(method), manifest, dtype)
    if model is not None and dtype_name(model.dtype) != dtype:
        raise ConfigError(
            f"the model passed in runs in {dtype_name(model.dtype)}, but the experiment harvests in {dtype}"
        )
    return replace(cfg, model_dtype=dtype)


def held_out_conversations(cfg: ReproduceConfig) -> list[list[dict[str, str]]]:
    """`cfg.eval_conversations` held-out chats, sampled across all chat files; frozen in OUT/heldout.jsonl."""
    from train.data import load_conversations

    path = cfg.out / HELDOUT_FILE
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    corpus = load_conversations(cfg.chat_data, split="held_out", held_out_fraction=cfg.held_out_fraction)
    if len(corpus) == 0:
        raise ConfigError(
            f"no held-out conversations in {cfg.chat_data} (held_out_fraction={cfg.held_out_fraction})"
        )
    items = list(corpus.items)
    chosen = random.Random(cfg.seed).sample(items, min(cfg.eval_conversations, len(items)))
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chosen), encoding="utf-8")
    return chosen


def _add_timing(run_dir: Path, key: str, seconds: float) -> None:
    path = run_dir / TIMING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    timing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    timing[key] = timing.get(key, 0.0) + seconds
    path.write_text(json.dumps(timing, indent=2) + "\n", encoding="utf-8")


def run_environment(device: str) -> dict[str, Any]:
    """Where a result was computed: software versions, CPU and device (recorded beside the results)."""
    import os
    import platform

    import torch

    from hub.model import library_versions

    return {
        "python": platform.python_version(),
        **library_versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "device": device,
        "load average at the end (1/5/15 min)": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def load_config(out: Path) -> ReproduceConfig | None:
    """The `ReproduceConfig` recorded in OUT/experiment.json (None if there is none), with OUT where it is
    now and the data paths resolved against it (`train.experiment_record`; the data need not exist)."""
    from dataclasses import fields

    record = read_record(out)
    if record is None:
        return None
    values = config_values(record, Path(out))
    return ReproduceConfig(**{f.name: values[f.name] for f in fields(ReproduceConfig) if f.name in values})


def steering_sae(out: Path, method: str) -> Path | None:
    """The SAE that the steering experiments use for `method`: of its fixed-coefficient (paper-view) SAEs
    in the `no-first` variant where it was trained (steering edits positions after position 0, and that
    SAE spends no capacity on the sink), else in the first variant, the one with the lowest held-out
    Δ LM loss (the first architecture while none is evaluated yet); None if it is not trained."""
    cfg = load_config(out)
    if cfg is None or method not in cfg.methods:
        return None
    runs = {r.variant: r for r in plan_runs(cfg) if r.method == method}
    run = runs.get("no-first") or runs[cfg.variants[0]]
    fixed = [run.sae_dirs[i] for i in cfg.paper_view_indices(run.variant)]
    trained = [d for d in fixed if _has_weights(d)]
    if not trained:
        return None

    def delta_lm_loss(folder: Path) -> float:
        path = folder / EVAL_FILE
        if not path.is_file():
            return float("inf")
        return json.loads(path.read_text(encoding="utf-8"))["metrics"].get("delta_lm_loss", float("inf"))

    return min(trained, key=delta_lm_loss)


def paper_view_sae(out: Path, method: str, arch: str) -> Path | None:
    """The fixed-coefficient (paper-view) `arch` SAE of `method`, in the `no-first` variant where it was
    trained, else in the first variant (as `steering_sae`); None if it is not trained."""
    cfg = load_config(out)
    if cfg is None or method not in cfg.methods or arch not in cfg.archs:
        return None
    runs = {r.variant: r for r in plan_runs(cfg) if r.method == method}
    run = runs.get("no-first") or runs[cfg.variants[0]]
    folder = run.sae_dirs[cfg.paper_view_indices(run.variant)[cfg.archs.index(arch)]]
    return folder if _has_weights(folder) else None


def harvest_method(
    cfg: ReproduceConfig,
    method: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool = True,
) -> None:
    """Harvest `cfg.cache_tokens` of `method`'s activations into its cache (a half-written one is redone)."""
    from train.activation_cache import write_cache
    from train.distributed import DistContext
    from train.pipeline import open_stream

    folder = cfg.cache_dir(method)
    if (folder / MANIFEST).is_file():
        return
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    stream, source = open_stream(
        cfg.run_config(method), DistContext.current(str(model.device)), (model, tokenizer)
    )
    write_cache(stream, folder, model_source=source, dtype=cfg.cache_dtype, max_tokens=cfg.cache_tokens,
                progress=progress)  # fmt: skip
    _add_timing(cfg.out / "cache", f"{method}_harvest_s", time.perf_counter() - start)


def shared_scale(cfg: ReproduceConfig) -> float | None:
    """One activation scale for every method and variant (None where the preset trains on raw
    activations): sqrt(d_in) / mean norm over the initialisation tokens of the first method's cache (FAST
    by default) read as the first variant reads it, frozen in OUT/activation_scale.json."""
    if cfg.base_config().normalize_activations == "none":
        return None
    path = cfg.out / SCALE_FILE
    if path.is_file():
        return float(json.loads(path.read_text(encoding="utf-8"))["norm_scaling_factor"])
    from train.distributed import DistContext
    from train.pipeline import estimate_norm_scaling_factor, open_stream

    method = cfg.methods[0]
    run = cfg.run_config(method, cfg.variants[0])
    stream, _ = open_stream(run, DistContext.current("cpu"))
    scale = estimate_norm_scaling_factor(stream, run.init_tokens)
    path.write_text(
        json.dumps(
            {"norm_scaling_factor": scale, "estimated_on": f"{method} cache, variant {cfg.variants[0]}"}
        )
        + "\n",
        encoding="utf-8",
    )
    return scale


def train_run(run: RunStatus, cfg: ReproduceConfig, progress: bool = True) -> None:
    """Train every SAE of one (method, variant) from the method's cache (resuming a checkpoint if any)."""
    from train.pipeline import train

    start = time.perf_counter()
    result = train(
        cfg.run_config(run.method, run.variant, shared_scale(cfg)),
        run.run_dir,
        resume=(run.run_dir / "checkpoints").is_dir(),
        progress=progress,
        created_by="fast-steer experiment reproduce",
    )
    _add_timing(run.run_dir, "train_s", time.perf_counter() - start)
    log.info("%s/%s: %d tokens at %.0f tokens/s", run.method, run.variant, result.tokens, result.tokens_per_s)


def evaluate_run(
    run: RunStatus,
    cfg: ReproduceConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    progress: bool = True,
) -> None:
    """Write `eval.json` into every SAE folder of `run` that lacks one (same held-out chats for all; the
    run's SAEs share one pass, `evaluate_saes`)."""
    from hub.sae_io import load_sae
    from train.evaluate import EvalConfig, evaluate_saes, write_eval

    todo = [d for d in run.sae_dirs if not (d / EVAL_FILE).is_file()]
    if not todo:
        return
    start = time.perf_counter()
    saes = [load_sae(d) for d in todo]
    eval_cfg = EvalConfig(max_conversations=len(conversations))
    results = evaluate_saes(saes, model, tokenizer, conversations, cfg.layer, eval_cfg, progress=progress)
    for sae_dir, result in zip(todo, results, strict=True):
        extra = {"sae_dir": str(sae_dir), "method": run.method, "variant": run.variant}
        tmp = write_eval(result, sae_dir / (EVAL_FILE + ".tmp"), extra)
        tmp.replace(sae_dir / EVAL_FILE)
    _add_timing(run.run_dir, "eval_s", time.perf_counter() - start)


def collect_rows(cfg: ReproduceConfig, runs: list[RunStatus]) -> list[ResultRow]:
    """One `ResultRow` per SAE folder, from its `eval.json`, `cfg.json` and the run's training log."""
    from train.plots import read_log

    rows = []
    for run in runs:
        timing_path = run.run_dir / TIMING_FILE
        timing = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else {}
        log_records = read_log(run.run_dir / "train_log.jsonl")
        config = cfg.train_config(run.variant)
        specs = config.resolved_specs()
        fixed = cfg.paper_view_indices(run.variant)
        for i, (spec, sae_dir) in enumerate(zip(specs, run.sae_dirs, strict=True)):
            report = json.loads((sae_dir / EVAL_FILE).read_text(encoding="utf-8"))
            meta = json.loads((sae_dir / CFG_FILE).read_text(encoding="utf-8"))
            training = meta.get("metadata", {}).get("training", {})
            rows.append(
                ResultRow(
                    method=run.method,
                    arch=meta["architecture"],
                    metrics=check_metrics(report.get("metrics", {}), str(sae_dir / EVAL_FILE)),
                    sae_dir=str(sae_dir),
                    tokens=training.get("tokens_trained"),
                    variant=run.variant,
                    coefficient=spec.sparsity_coefficient,
                    init_threshold=spec.jumprelu_init_threshold,
                    paper_view=i in fixed,
                    extra={
                        "run_train_s": timing.get("train_s"),
                        "run_eval_s": timing.get("eval_s"),
                        "gsnr": mean_gsnr(log_records, spec.name if len(specs) > 1 else None),
                        "mse_by_token_type": {
                            k: v["mse"] for k, v in report.get("mse_by_token_type", {}).items()
                        },
                    },
                )
            )
    return rows


def _harvest_line(cfg: ReproduceConfig, method: str) -> str:
    """What `method`'s cache manifest says about how it was computed (`harvest_summary`)."""
    folder = cfg.cache_dir(method)
    return harvest_summary(read_manifest(folder)) if (folder / MANIFEST).is_file() else "cache removed"


@dataclass
class ReproduceResult:
    rows: list[ResultRow]
    paths: dict[str, Path]
    trained: list[str]  # "method/variant" runs trained (or resumed) by this invocation
    evaluated: list[str]  # "method/variant" runs with at least one SAE evaluated by this invocation


def reproduce(
    cfg: ReproduceConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    command: str | None = None,
) -> ReproduceResult:
    """Harvest each method's cache, train (or resume, or reuse) every SAE from it, evaluate them, and
    write the results. `model`/`tokenizer`: an already-loaded model (tests); otherwise `cfg.model` is
    loaded in `cfg.model_dtype` (resolved, `resolve_model_dtype`). `command`: the command line, recorded in
    the results."""
    cfg = resolve_model_dtype(cfg, model)
    check_settings(cfg)
    runs = plan_runs(cfg)
    todo_train = [r for r in runs if not r.trained]
    todo_eval = [r for r in runs if not r.finished]
    if (todo_train or todo_eval) and model is None:
        from hub import load_model

        model, tokenizer = load_model(cfg.model, dtype=cfg.model_dtype, device=cfg.device)
    for run in todo_train:  # method by method, so that a method's SAEs are ready before the next harvest
        harvest_method(cfg, run.method, model, tokenizer, progress=progress)
        log.info("training %s/%s -> %s", run.method, run.variant, run.run_dir)
        train_run(run, cfg, progress=progress)
    if todo_eval:
        conversations = held_out_conversations(cfg)
        for run in todo_eval:
            evaluate_run(run, cfg, model, tokenizer, conversations, progress=progress)
    rows = collect_rows(cfg, runs)
    base = cfg.base_config()
    header = {
        "model": cfg.model,
        "layer": cfg.layer,
        "tokens per SAE": base.final_tokens,
        "preset": cfg.preset,
        "batch size": base.batch_size,
        "expansion": cfg.expansion,
        "variants": list(cfg.variants),
        "activation scale": shared_scale(cfg),
        **{f"{METHOD_LABELS[m]} harvest": _harvest_line(cfg, m) for m in cfg.methods},
        "held-out conversations": len(held_out_conversations(cfg)),
        "chat data": cfg.chat_data,
        "pretraining data": cfg.pretrain_data,
        "written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": run_environment(str(model.device) if model is not None else cfg.device),
    }
    if command:
        header["command"] = command
    paths = write_results(rows, cfg.out, header)
    label = [f"{r.method}/{r.variant}" for r in todo_train], [f"{r.method}/{r.variant}" for r in todo_eval]
    return ReproduceResult(rows, paths, *label)

"""`reproduce`: FAST vs BT(F) vs BT(P) SAEs with identical settings, evaluated on the same held-out chats.

Layout of the output folder (re-running reuses finished runs and resumes unfinished ones):

    OUT/experiment.json              the settings (a rerun with other settings is refused)
    OUT/heldout.jsonl                the held-out conversations every SAE is evaluated on
    OUT/runs/<method>/               one trainer run per method: one activation stream feeds all archs
    OUT/runs/<method>/<sae>/         an SAE folder (cfg.json + sae_weights.safetensors) + eval.json
    OUT/runs/<method>/timing.json    wall seconds spent training / evaluating (summed over resumes)
    OUT/results.{json,md,png}        the table

A run is finished when every SAE folder of it has its weights and `eval.json`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hub import fast_dtype
from train.config import SAETrainSpec, TrainConfig, preset_config
from train.results_table import ResultRow, check_metrics, write_results

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
METHODS = ("fast", "bt-f", "bt-p")
ARCHS = ("standard", "jumprelu")
# ~1 hour end to end for the three methods on an idle 2-core CPU (SmolLM2-135M, layer 15, bf16 harvesting).
DEFAULT_TOKENS = 1_500_000
EVAL_FILE = "eval.json"
TIMING_FILE = "timing.json"
SETTINGS_FILE = "experiment.json"
HELDOUT_FILE = "heldout.jsonl"
SCALE_FILE = "activation_scale.json"


@dataclass
class ReproduceConfig:
    """Settings of a reproduce run; the same for every method so that only the data differs."""

    out: Path
    model: str = "default"
    layer: int = 15
    tokens: int = DEFAULT_TOKENS
    chat_data: list[str] = field(default_factory=lambda: [str(SHARED_DATA / "chat")])
    pretrain_data: list[str] = field(default_factory=lambda: [str(SHARED_DATA / "pretrain")])
    methods: tuple[str, ...] = METHODS
    archs: tuple[str, ...] = ARCHS
    expansion: int = 8
    preset: str = "default"
    batch_size: int | None = None  # tokens per step; None = the preset's
    l1_coefficient: float | None = None  # standard SAEs; None = the preset's
    l0_coefficient: float | None = None  # jumprelu SAEs; None = the preset's
    buffer_tokens: int = 65536  # mixing buffer (at least 2 x batch size)
    max_len: int = 8192  # FAST truncation of a conversation
    model_dtype: str = "auto"  # harvesting dtype (hub.fast_dtype; the SAEs train in float32)
    device: str = "auto"
    eval_conversations: int = 200
    held_out_fraction: float = 0.05
    seed: int = 42

    def __post_init__(self) -> None:
        self.out = Path(self.out).expanduser()
        self.methods, self.archs = tuple(self.methods), tuple(self.archs)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(
                f"methods must be a non-empty subset of {', '.join(METHODS)}; got {list(self.methods)}"
            )
        if not self.archs:
            raise ValueError("at least one SAE architecture is needed")
        if self.tokens <= 0 or self.eval_conversations <= 0:
            raise ValueError(
                f"tokens and eval_conversations must be positive (got {self.tokens}, {self.eval_conversations})"
            )
        for label, paths in (("chat data", self.chat_data), ("pretraining data", self.pretrain_data)):
            missing = [p for p in paths if not Path(p).expanduser().exists()]
            if missing:
                raise FileNotFoundError(f"{label} not found: {', '.join(missing)}")
        self.train_config()  # validates the architectures, expansion and preset

    def train_config(self) -> TrainConfig:
        """The one `TrainConfig` every method uses."""
        specs = [SAETrainSpec(arch=arch, expansion=self.expansion) for arch in self.archs]
        return preset_config(
            self.preset,
            total_tokens=self.tokens,
            batch_size=self.batch_size,
            l1_coefficient=self.l1_coefficient,
            l0_coefficient=self.l0_coefficient,
            seed=self.seed,
            saes=specs,
        )

    def run_config(self, method: str, norm_scaling_factor: float | None = None):
        """The pipeline's `RunConfig` of one method: identical settings, only the data differs."""
        from dataclasses import replace

        from train.run_config import DataConfig, RunConfig, StreamSettings

        training = self.train_config()
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
            ),
            stream=StreamSettings(buffer_tokens=self.buffer_tokens, max_len=self.max_len),
        )

    def settings(self) -> dict[str, Any]:
        """What must match for a rerun to reuse this folder's runs (JSON-able)."""
        out = asdict(self)
        out["out"] = str(self.out)
        out.pop("device")  # where it runs does not change what it computes
        out["methods"], out["archs"] = list(self.methods), list(self.archs)
        # the resolved optimisation settings, so that a changed preset is noticed instead of retraining
        out["train_config"] = json.loads(json.dumps(self.train_config().to_dict()))
        return out


@dataclass
class RunStatus:
    """One method's trainer run: where it lives and what is already done."""

    method: str
    run_dir: Path
    sae_dirs: list[Path]

    @property
    def trained(self) -> bool:
        return all(_has_weights(d) for d in self.sae_dirs)

    @property
    def finished(self) -> bool:
        return all(_has_weights(d) and (d / EVAL_FILE).is_file() for d in self.sae_dirs)


def _has_weights(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()


def plan_runs(cfg: ReproduceConfig) -> list[RunStatus]:
    """The runs of `cfg`, one per method, with their SAE folders (named as the trainer names them)."""
    names = [spec.name for spec in cfg.train_config().resolved_specs()]
    runs = []
    for method in cfg.methods:
        run_dir = cfg.out / "runs" / method
        dirs = [run_dir / name for name in names] if len(names) > 1 else [run_dir]
        runs.append(RunStatus(method, run_dir, dirs))
    return runs


def check_settings(cfg: ReproduceConfig) -> None:
    """Record the settings in OUT/experiment.json, or refuse if the folder holds runs with other settings."""
    path = cfg.out / SETTINGS_FILE
    mine = cfg.settings()
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in diff)
            raise ValueError(
                f"{cfg.out} holds an experiment with other settings ({detail}); use another --out"
            )
        return
    cfg.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2) + "\n", encoding="utf-8")


def held_out_conversations(cfg: ReproduceConfig) -> list[list[dict[str, str]]]:
    """`cfg.eval_conversations` held-out chats, sampled across all chat files; frozen in OUT/heldout.jsonl."""
    from train.data import load_conversations

    path = cfg.out / HELDOUT_FILE
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    corpus = load_conversations(cfg.chat_data, split="held_out", held_out_fraction=cfg.held_out_fraction)
    if len(corpus) == 0:
        raise ValueError(
            f"no held-out conversations in {cfg.chat_data} (held_out_fraction={cfg.held_out_fraction})"
        )
    items = list(corpus.items)
    chosen = random.Random(cfg.seed).sample(items, min(cfg.eval_conversations, len(items)))
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chosen), encoding="utf-8")
    return chosen


def _add_timing(run_dir: Path, key: str, seconds: float) -> None:
    path = run_dir / TIMING_FILE
    timing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    timing[key] = timing.get(key, 0.0) + seconds
    path.write_text(json.dumps(timing, indent=2) + "\n", encoding="utf-8")


def shared_scale(
    cfg: ReproduceConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> float | None:
    """One activation scale for every method (None where the preset trains on raw activations):
    sqrt(d_in) / mean norm over the FAST stream's initialisation tokens, frozen in OUT/activation_scale.json."""
    if cfg.train_config().normalize_activations == "none":
        return None
    path = cfg.out / SCALE_FILE
    if path.is_file():
        return float(json.loads(path.read_text(encoding="utf-8"))["norm_scaling_factor"])
    from train.distributed import DistContext
    from train.pipeline import estimate_norm_scaling_factor, open_stream

    run = cfg.run_config("fast")
    stream, _ = open_stream(run, DistContext.current(str(model.device)), (model, tokenizer))
    scale = estimate_norm_scaling_factor(stream, run.init_tokens)
    path.write_text(
        json.dumps({"norm_scaling_factor": scale, "estimated_on": "fast"}) + "\n", encoding="utf-8"
    )
    return scale


def train_run(
    run: RunStatus,
    cfg: ReproduceConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    progress: bool = True,
) -> None:
    """Train every architecture of one method on one activation stream (resuming a checkpoint if any)."""
    from train.pipeline import train

    start = time.perf_counter()
    result = train(
        cfg.run_config(run.method, shared_scale(cfg, model, tokenizer)),
        run.run_dir,
        loaded=(model, tokenizer),
        resume=(run.run_dir / "checkpoints").is_dir(),
        progress=progress,
        created_by="fast-steer experiment reproduce",
    )
    _add_timing(run.run_dir, "train_s", time.perf_counter() - start)
    log.info("%s: %d tokens at %.0f tokens/s", run.method, result.tokens, result.tokens_per_s)


def evaluate_run(
    run: RunStatus,
    cfg: ReproduceConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    progress: bool = True,
) -> None:
    """Write `eval.json` into every SAE folder of `run` that lacks one (same held-out chats for all)."""
    from hub.sae_io import load_sae
    from train.evaluate import EvalConfig, evaluate_sae, write_eval

    eval_cfg = EvalConfig(max_conversations=len(conversations))
    for sae_dir in run.sae_dirs:
        if (sae_dir / EVAL_FILE).is_file():
            continue
        start = time.perf_counter()
        sae = load_sae(sae_dir)
        result = evaluate_sae(sae, model, tokenizer, conversations, cfg.layer, eval_cfg, progress=progress)
        tmp = write_eval(
            result, sae_dir / (EVAL_FILE + ".tmp"), {"sae_dir": str(sae_dir), "method": run.method}
        )
        tmp.replace(sae_dir / EVAL_FILE)
        _add_timing(run.run_dir, "eval_s", time.perf_counter() - start)


def collect_rows(runs: list[RunStatus]) -> list[ResultRow]:
    """One `ResultRow` per SAE folder, from its `eval.json` and `cfg.json`."""
    rows = []
    for run in runs:
        for sae_dir in run.sae_dirs:
            report = json.loads((sae_dir / EVAL_FILE).read_text(encoding="utf-8"))
            meta = json.loads((sae_dir / "cfg.json").read_text(encoding="utf-8"))
            training = meta.get("metadata", {}).get("training", {})
            timing_path = run.run_dir / TIMING_FILE
            timing = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else {}
            rows.append(
                ResultRow(
                    method=run.method,
                    arch=meta["architecture"],
                    metrics=check_metrics(report.get("metrics", {}), str(sae_dir / EVAL_FILE)),
                    sae_dir=str(sae_dir),
                    tokens=training.get("tokens_trained"),
                    extra={
                        "run_train_s": timing.get("train_s"),
                        "run_eval_s": timing.get("eval_s"),
                        "mse_by_token_type": {
                            k: v["mse"] for k, v in report.get("mse_by_token_type", {}).items()
                        },
                    },
                )
            )
    return rows


@dataclass
class ReproduceResult:
    rows: list[ResultRow]
    paths: dict[str, Path]
    trained: list[str]  # methods trained (or resumed) by this invocation
    evaluated: list[str]  # methods with at least one SAE evaluated by this invocation


def reproduce(
    cfg: ReproduceConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> ReproduceResult:
    """Train (or resume, or reuse) every method's SAEs, evaluate them, and write the results table.

    `model`/`tokenizer`: an already-loaded model (tests); otherwise `cfg.model` is loaded in `cfg.model_dtype`.
    """
    check_settings(cfg)
    runs = plan_runs(cfg)
    todo_train = [r for r in runs if not r.trained]
    todo_eval = [r for r in runs if not r.finished]
    if (todo_train or todo_eval) and model is None:
        from hub import load_model

        model, tokenizer = load_model(cfg.model, dtype=cfg.model_dtype, device=cfg.device)
    for run in todo_train:
        log.info("training %s -> %s", run.method, run.run_dir)
        train_run(run, cfg, model, tokenizer, progress=progress)
    if todo_eval:
        conversations = held_out_conversations(cfg)
        for run in todo_eval:
            evaluate_run(run, cfg, model, tokenizer, conversations, progress=progress)
    rows = collect_rows(runs)
    header = {
        "model": cfg.model,
        "layer": cfg.layer,
        "tokens per SAE": cfg.train_config().final_tokens,
        "preset": cfg.preset,
        "batch size": cfg.train_config().batch_size,
        "expansion": cfg.expansion,
        "harvest dtype": fast_dtype() if cfg.model_dtype == "auto" else cfg.model_dtype,
        "held-out conversations": len(held_out_conversations(cfg)),
        "chat data": cfg.chat_data,
        "pretraining data": cfg.pretrain_data,
        "written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    paths = write_results(rows, cfg.out, header)
    return ReproduceResult(rows, paths, [r.method for r in todo_train], [r.method for r in todo_eval])

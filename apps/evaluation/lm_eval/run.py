"""`fast-steer lm-eval`: lm-eval's own CLI with the `fast-steer` model and local benchmark tasks.

Every lm-eval option works as usual (`run` is implied, `ls` and `validate` pass through). On top:
the model class `fast-steer` is registered and is the default `--model`; task YAMLs for the local
benchmark files (`mmlu_local`, `mmlu_local_<subject>`, `gsm8k_local`) are added to `--include_path`;
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set when the Hub is unreachable; `--compare` evaluates the
plain and the steered model in one run (one model load) and prints one table; `allow_unsteered` lets a run
go on when a spec edits no position in a whole task (the adapter stops it otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steer.errors import ConfigError, MissingFileError
from train.data import find_shared_data

if TYPE_CHECKING:
    from hub import DeviceMap

log = logging.getLogger(__name__)

EVAL_DATA_ENV = "FAST_STEER_EVAL_DATA"


@dataclass
class CompareRow:
    """One metric of one task (or group) for the plain and the steered model."""

    task: str
    metric: str
    filter: str
    n_shot: Any
    base: float | None
    steered: float | None

    @property
    def delta(self) -> float | None:
        if self.base is None or self.steered is None:
            return None
        return self.steered - self.base


def ensure_offline_env() -> bool:
    """Set HF_HUB_OFFLINE and HF_DATASETS_OFFLINE when the Hub cannot be reached; True if set."""
    from hub.cache import hub_reachable

    ok, why = hub_reachable()
    if ok:
        return False
    log.info("Hugging Face Hub unreachable (%s): running lm-eval offline", why)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return True


def run_lm_eval(
    args: Sequence[str],
    eval_data: str | Path | None = None,
    compare: bool = False,
    echo: Callable[[str], None] = print,
    allow_unsteered: bool = False,
    device_map: DeviceMap | None = None,
) -> list | None:
    """Hand `args` (lm-eval command-line arguments) to lm-eval's CLI; with `compare`, return the rows.

    `eval_data`: the folder with the local benchmark files; None = `$FAST_STEER_EVAL_DATA` or
    the shared data's `eval` folder when present (`train.data.find_shared_data`). `echo` prints the comparison table.
    `allow_unsteered`: the `fast-steer` model's `allow_unsteered=true` (go on when a spec edits nothing in a task).
    """
    ensure_offline_env()
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import apps.evaluation.lm_eval.model  # noqa: F401  (registers the `fast-steer` model class)
    from apps.evaluation.lm_eval.tasks import materialize_tasks

    setup_logging()
    cli = HarnessCLI()
    namespace = _parse(cli, args)
    data = _eval_data_dir(eval_data)
    local = None
    with tempfile.TemporaryDirectory(prefix="fast-steer-tasks-") as tmp:
        if hasattr(namespace, "include_path"):
            if data is not None:
                local = materialize_tasks(data, tmp)
                user = namespace.include_path
                namespace.include_path = [str(local.include_path), *([user] if user else [])]
                log.info("local tasks from %s: %s, groups %s", data, len(local.tasks), local.groups)
            else:
                log.info("no local benchmark folder found; only lm-eval's own tasks are available")
        if getattr(namespace, "command", None) == "run" and not namespace.model:
            namespace.model = apps.evaluation.lm_eval.model.MODEL_NAME
        if allow_unsteered:
            _allow_unsteered(namespace)
        if device_map is not None:
            _use_device_map(namespace, device_map)
        if compare and getattr(namespace, "command", None) != "run":
            raise ConfigError("--compare works with `run` (the default lm-eval command)")
        with _task_errors(local):
            if compare:
                return compare_run(namespace, local, echo)
            cli.execute(namespace)
    return None


@contextmanager
def _task_errors(local) -> Iterator[None]:
    """lm-eval's "Tasks not found" (a ValueError from deep inside it) as one clear error naming the choices."""
    try:
        yield
    except ValueError as err:
        if not str(err).startswith("Tasks not found"):
            raise
        names = set() if local is None else {*local.groups, *local.tasks}
        top = [
            n for n in sorted(names) if not any(n.startswith(f"{g}_") for g in local.groups)
        ]  # no subtasks
        raise ConfigError(
            f"lm-eval: {err}. Local tasks: {', '.join(top) or 'none (no --eval-data folder found)'}; "
            "`fast-steer lm-eval ls tasks` lists every task"
        ) from None


def _allow_unsteered(namespace) -> None:
    """Add `allow_unsteered=true` to the `fast-steer` model's arguments."""
    from apps.evaluation.lm_eval.model import MODEL_NAME

    if getattr(namespace, "command", None) != "run" or namespace.model != MODEL_NAME:
        raise ConfigError(
            f"--allow-unsteered applies to `run` with --model {MODEL_NAME} (the model that steers), "
            f"got --model {getattr(namespace, 'model', None)}"
        )
    namespace.model_args = {**(namespace.model_args or {}), "allow_unsteered": True}


def _use_device_map(namespace, device_map: DeviceMap) -> None:
    """Hand `device_map` to the `fast-steer` model's arguments; refused beside lm-eval's own `--device` (the
    map places the model itself)."""
    from apps.evaluation.lm_eval.model import MODEL_NAME

    if getattr(namespace, "command", None) != "run" or namespace.model != MODEL_NAME:
        raise ConfigError(
            f"--device-map applies to `run` with --model {MODEL_NAME}, got --model {getattr(namespace, 'model', None)}"
        )
    if getattr(namespace, "device", None) is not None:
        raise ConfigError(
            f"--device-map {device_map.strategy} places the model itself, so it conflicts with lm-eval's "
            f"--device {namespace.device}: give one or the other"
        )
    given = {"device_map": device_map.strategy, "max_memory": device_map.max_memory,
             "offload_folder": device_map.offload_folder}  # fmt: skip
    namespace.model_args = {
        **(namespace.model_args or {}),
        **{k: v for k, v in given.items() if v is not None},
    }


def _parse(cli, args: Sequence[str]):
    """lm-eval's own argument parsing (it inserts `run` when no subcommand is given)."""
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        return cli.parse_args()
    finally:
        sys.argv = saved


def _eval_data_dir(eval_data: str | Path | None) -> Path | None:
    if eval_data is not None:
        path = Path(eval_data).expanduser()
        if not path.is_dir():
            raise MissingFileError(f"--eval-data: {path} is not a folder")
        return path
    if os.environ.get(EVAL_DATA_ENV):
        return _eval_data_dir(os.environ[EVAL_DATA_ENV])
    return find_shared_data("eval")


def compare_run(namespace, local=None, echo: Callable[[str], None] = print) -> list[CompareRow]:
    """Evaluate the plain and the steered model (one load) on the same tasks; print and return the rows.

    When every task asked for is a local one (`local`: what `materialize_tasks` wrote), lm-eval's
    own task folders are not indexed, which saves the seconds that indexing takes.
    """
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from apps.evaluation.lm_eval.model import FastSteerLM

    cfg = EvaluatorConfig.from_cli(namespace)
    names = [
        t for task in ([cfg.tasks] if isinstance(cfg.tasks, str) else cfg.tasks) for t in task.split(",")
    ]
    if local is not None and names and set(names) <= {*local.tasks, *local.groups}:
        task_manager = TaskManager(
            include_path=cfg.include_path, include_defaults=False, metadata=cfg.metadata
        )
        cfg.tasks = names
    else:
        task_manager = cfg.process_tasks(cfg.metadata)
    model_cls = get_model(cfg.model)
    if not issubclass(model_cls, FastSteerLM):
        raise ConfigError(f"--compare needs --model fast-steer, got --model {cfg.model}")
    lm = model_cls.create_from_arg_obj(
        cfg.model_args,
        {"batch_size": cfg.batch_size, "max_batch_size": cfg.max_batch_size, "device": cfg.device},
    )
    if not lm.specs:
        raise ConfigError("--compare needs a steering spec: --model_args ...,spec=FILE")
    seeds = cfg.seed or [None, None, None, None]
    common = dict(
        tasks=cfg.tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        samples=cfg.samples,
        log_samples=bool(cfg.log_samples),
        task_manager=task_manager,
        system_instruction=cfg.system_instruction,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn,
        gen_kwargs=cfg.gen_kwargs,
        predict_only=cfg.predict_only,
        random_seed=seeds[0],
        numpy_random_seed=seeds[1],
        torch_random_seed=seeds[2],
        fewshot_random_seed=seeds[3],
        confirm_run_unsafe_code=cfg.confirm_run_unsafe_code,
        metadata=cfg.metadata,
    )
    with lm.steering_disabled():
        base = simple_evaluate(model=lm, **common)
    steered = simple_evaluate(model=lm, **common)
    rows = compare_results(base, steered)
    echo("\n" + format_compare_table(rows))
    if cfg.output_path:
        out = Path(cfg.output_path)
        out = out if out.suffix == ".json" else out / "compare.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model_args": cfg.model_args,
            "rows": [asdict(r) | {"delta": r.delta} for r in rows],
            "base": base,
            "steered": steered,
        }
        out.write_text(json.dumps(payload, indent=2, default=handle_non_serializable), encoding="utf-8")
        echo(f"wrote {out}")
    return rows


def compare_results(base: dict, steered: dict) -> list[CompareRow]:
    """Rows for every task/group metric present in either lm-eval result dict (stderr left out)."""
    rows: list[CompareRow] = []
    tasks = list(dict.fromkeys([*base.get("results", {}), *steered.get("results", {})]))
    for task in tasks:
        b = base.get("results", {}).get(task, {})
        s = steered.get("results", {}).get(task, {})
        for key in dict.fromkeys([*b, *s]):
            if "," not in key or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            n_shot = base.get("n-shot", {}).get(task, "")
            rows.append(CompareRow(task, metric, filt, n_shot, _number(b.get(key)), _number(s.get(key))))
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def format_compare_table(rows: Sequence[CompareRow]) -> str:
    """A markdown table: task, metric, filter, n-shot, base, steered, delta."""
    header = ["Task", "Metric", "Filter", "n-shot", "Base", "Steered", "Δ"]

    def fmt(x: float | None, signed: bool = False) -> str:
        return "—" if x is None else (f"{x:+.4f}" if signed else f"{x:.4f}")

    body = [
        [r.task, r.metric, r.filter, str(r.n_shot), fmt(r.base), fmt(r.steered), fmt(r.delta, True)]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in body
    ]
    return "\n".join(lines)

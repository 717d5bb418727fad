"""lm-eval task definitions for local benchmark files (MMLU, GSM8K, IFEval, ARC-Easy), materialised per data folder.

The shipped YAMLs name their data files as `__EVAL_DATA__/<file>.jsonl`; `materialize_tasks`
writes a task folder (for lm-eval's `--include_path`) with that placeholder replaced by the
user's data folder and one task per MMLU subject found in the data, plus the group `mmlu_local`.
IFEval's checkers read NLTK's `punkt_tab` from `nltk_data/` beside the data folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.errors import ConfigError, MissingFileError
from train.data import DataFormatError

TEMPLATE_DIR = Path(__file__).resolve().parent
PLACEHOLDER = "__EVAL_DATA__"
MMLU_FILES = ("mmlu_test.jsonl", "mmlu_val.jsonl", "mmlu_dev.jsonl")
GSM8K_FILES = ("gsm8k_test.jsonl", "gsm8k_train.jsonl")
IFEVAL_FILES = ("ifeval_input_data.jsonl",)
ARC_EASY_FILES = ("arc_easy_train.jsonl", "arc_easy_validation.jsonl", "arc_easy_test.jsonl")
NLTK_PLACEHOLDER = "__NLTK_DATA__"
IFEVAL_TASK = "ifeval_local"
ARC_EASY_TASK = "arc_easy_local"
MMLU_TEMPLATE = "_mmlu_local_template.yaml"
MMLU_GROUP = "mmlu_local"


@dataclass
class LocalTasks:
    """What `materialize_tasks` wrote: the include folder and the task and group names in it."""

    include_path: Path
    tasks: list[str]
    groups: list[str]


def materialize_tasks(eval_data: str | Path, dest: str | Path) -> LocalTasks:
    """Write the local task YAMLs for the benchmark files in `eval_data` into folder `dest`.

    MMLU tasks are written when all of `mmlu_{test,val,dev}.jsonl` exist, GSM8K when
    `gsm8k_{test,train}.jsonl` exist, IFEval when `ifeval_input_data.jsonl` and the NLTK folder
    `<eval_data>/../nltk_data` exist, ARC-Easy when `arc_easy_{train,validation,test}.jsonl` exist;
    at least one set must be there.
    """
    data = Path(eval_data).expanduser().resolve()
    if not data.is_dir():
        raise MissingFileError(f"eval data folder {data} does not exist")
    if any(ch in str(data) for ch in '"\\\n'):
        raise ConfigError(f"eval data folder {data} contains a quote, backslash or newline; use another path")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    tasks: list[str] = []
    groups: list[str] = []
    if all((data / name).is_file() for name in MMLU_FILES):
        subjects = _mmlu_subjects(data / MMLU_FILES[0])
        _write_filled(TEMPLATE_DIR / MMLU_TEMPLATE, out / "_mmlu_local_template_yaml", data)
        shutil.copyfile(TEMPLATE_DIR / "utils.py", out / "utils.py")
        for subject in subjects:
            name = f"{MMLU_GROUP}_{subject}"
            (out / f"{name}.yaml").write_text(_subject_yaml(name, subject), encoding="utf-8")
            tasks.append(name)
        (out / f"{MMLU_GROUP}.yaml").write_text(_group_yaml(MMLU_GROUP, tasks), encoding="utf-8")
        groups.append(MMLU_GROUP)
    if all((data / name).is_file() for name in GSM8K_FILES):
        _write_filled(TEMPLATE_DIR / "gsm8k_local.yaml", out / "gsm8k_local.yaml", data)
        tasks.append("gsm8k_local")
    nltk_data = data.parent / "nltk_data"
    if all((data / name).is_file() for name in IFEVAL_FILES) and nltk_data.is_dir():
        _write_filled(TEMPLATE_DIR / f"{IFEVAL_TASK}.yaml", out / f"{IFEVAL_TASK}.yaml", data)
        utils = (TEMPLATE_DIR / "ifeval_utils.py").read_text(encoding="utf-8")
        (out / "ifeval_utils.py").write_text(
            utils.replace(NLTK_PLACEHOLDER, str(nltk_data)), encoding="utf-8"
        )
        tasks.append(IFEVAL_TASK)
    if all((data / name).is_file() for name in ARC_EASY_FILES):
        _write_filled(TEMPLATE_DIR / f"{ARC_EASY_TASK}.yaml", out / f"{ARC_EASY_TASK}.yaml", data)
        tasks.append(ARC_EASY_TASK)
    if not tasks:
        expected = (MMLU_FILES, GSM8K_FILES, IFEVAL_FILES, ARC_EASY_FILES)
        raise MissingFileError(
            f"no benchmark files in {data}: expected any of the sets "
            + "; ".join(", ".join(files) for files in expected)
        )
    return LocalTasks(include_path=out, tasks=tasks, groups=groups)


@contextmanager
def local_task_manager(eval_data: str | Path, needed: Sequence[str], hint: str = "") -> Iterator[Any]:
    """lm-eval's `TaskManager` over the local tasks of `eval_data` only, written to a temporary folder that
    lasts as long as the block. `MissingFileError` (with `hint` appended) names any `needed` task whose
    files are not there."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="fast-steer-tasks-") as tmp:
        local = materialize_tasks(eval_data, tmp)
        missing = [task for task in needed if task not in local.tasks]
        if missing:
            raise MissingFileError(f"{eval_data}: missing the data for {', '.join(missing)}{hint}")
        yield TaskManager(include_path=str(local.include_path), include_defaults=False)


def _mmlu_subjects(path: Path) -> list[str]:
    subjects: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                subjects.add(json.loads(line)["subject"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataFormatError(
                    f"{path}:{lineno}: expected a JSON object with a 'subject' field ({exc})"
                ) from exc
    bad = [s for s in subjects if not s.isidentifier()]
    if bad:
        raise DataFormatError(
            f"{path}: subject names must be identifiers like 'abstract_algebra', got {bad[:3]}"
        )
    return sorted(subjects)


def _write_filled(template: Path, target: Path, data: Path) -> None:
    target.write_text(template.read_text(encoding="utf-8").replace(PLACEHOLDER, str(data)), encoding="utf-8")


def _subject_yaml(task: str, subject: str) -> str:
    description = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )
    return (
        "include: _mmlu_local_template_yaml\n"
        f"task: {task}\n"
        f"task_alias: {subject}\n"
        f"description: {json.dumps(description)}\n"
        f"process_docs: !function utils.process_{subject}\n"
    )


def _group_yaml(group: str, tasks: list[str]) -> str:
    lines = [f"group: {group}", "task:"] + [f"  - {t}" for t in tasks]
    lines += [
        "aggregate_metric_list:",
        "  - metric: acc",
        "    weight_by_size: true",
        "metadata:",
        "  version: 2",
    ]
    return "\n".join(lines) + "\n"

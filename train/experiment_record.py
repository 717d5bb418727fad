"""OUT/experiment.json: the settings of a `reproduce` folder, written so that the folder can move.

Version 2 (`format_version`): the folder's own path is not stored; each data source is
`{"path": ..., "sha256": ...}`, its path relative to the folder when the data lies inside it, else the path
as given (made absolute); the model dtype is resolved (never `auto`). Paths load relative to where the
folder is now, and a data source is accepted wherever it lies when its content hash matches the recorded one.

Version 1 (no `format_version`, written before): the folder's absolute path under `out`, data as plain
paths, `model_dtype` possibly `auto`. It loads as it is (its `out` ignored), and the next `reproduce` whose
settings match upgrades it to version 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steer.errors import ConfigError
from train.data import source_sha256

SETTINGS_FILE = "experiment.json"
FORMAT_VERSION = 2
# ReproduceConfig field -> (loader kind, label in messages)
DATA_FIELDS = {"chat_data": ("chat", "chat data"), "pretrain_data": ("text", "pretraining data")}


def data_ref(source: str | Path, out: Path, kind: str) -> dict[str, str]:
    """How version 2 records one data source: its path (relative to `out` when inside it) and content hash."""
    path = Path(source).expanduser().absolute()
    try:
        stored = path.relative_to(out.expanduser().absolute()).as_posix()
    except ValueError:
        stored = str(path)
    return {"path": stored, "sha256": source_sha256(path, kind)}


def read_record(out: Path) -> dict[str, Any] | None:
    """The raw content of OUT/experiment.json (None if there is none), checked for a known version."""
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    version = record.get("format_version", 1)
    if version not in (1, FORMAT_VERSION):
        raise ConfigError(
            f"{path}: format_version {version!r}, expected 1 or {FORMAT_VERSION} (written by a newer fast-steer?)"
        )
    return record


def write_record(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (SETTINGS_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / SETTINGS_FILE)


def config_values(record: dict[str, Any], out: Path) -> dict[str, Any]:
    """The record as `ReproduceConfig` keyword values: `out` is where the folder is now, and data paths
    recorded relative to the folder are resolved against it."""
    values = {k: v for k, v in record.items() if k != "format_version"}
    values["out"] = Path(out)
    for name in DATA_FIELDS:
        if name in values:
            values[name] = [_resolve(entry, Path(out)) for entry in values[name]]
    return values


def _resolve(entry: str | dict[str, str], out: Path) -> str:
    if isinstance(entry, str):  # version 1: the path as given
        return entry
    path = Path(entry["path"])
    return str(path if path.is_absolute() else out / path)


def differences(saved: dict[str, Any], mine: dict[str, Any], out: Path) -> list[str]:
    """What differs between the settings recorded in `out` and a rerun's (both as `ReproduceConfig.settings`
    writes them; `saved` may be version 1), one readable line each; empty when the rerun may reuse OUT."""
    old = saved.get("format_version", 1) == 1
    lines = []
    for key in sorted(set(saved) | set(mine)):
        if key in ("format_version", "out"):
            continue
        if key in DATA_FIELDS:
            lines += _data_differences(DATA_FIELDS[key][1], saved.get(key, []), mine.get(key, []), Path(out))
        elif key == "model_dtype":
            if saved.get(key) != mine.get(key) and not (old and saved.get(key) == "auto"):
                lines.append(
                    f"model_dtype: saved {saved.get(key)!r}, now {mine.get(key)!r} (its activations were "
                    f"harvested with the model in {saved.get(key)}: pass --dtype {saved.get(key)} or auto)"
                )
        elif saved.get(key) != mine.get(key):
            lines.append(f"{key}: saved {saved.get(key)!r}, now {mine.get(key)!r}")
    return lines


def _data_differences(label: str, saved: list, mine: list[dict[str, str]], out: Path) -> list[str]:
    if len(saved) != len(mine):
        return [f"{label}: saved {len(saved)} sources, now {len(mine)}"]
    lines = []
    for was, now in zip(saved, mine, strict=True):
        path = _resolve(now, out)
        if isinstance(
            was, str
        ):  # version 1 recorded no hash: only the same path is known to be the same data
            if Path(was).expanduser().absolute() != Path(path).absolute():
                lines.append(
                    f"{label}: saved {was!r} (an experiment.json without content hashes), now {path!r}: "
                    "pass the recorded path"
                )
        elif was["sha256"] != now["sha256"]:
            lines.append(
                f"{label}: {path!r} has sha256 {now['sha256']}, but the experiment was run on "
                f"{_resolve(was, out)!r} with sha256 {was['sha256']} (changed data: pass the data it was run on)"
            )
    return lines

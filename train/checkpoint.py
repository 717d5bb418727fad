"""Atomic training checkpoints: tensors in safetensors, everything else in JSON (never pickle).

Layout of `CKPT_DIR`:

    step_000000120/            a complete checkpoint (renamed into place only once fully written)
        trainer.safetensors    SAE weights, optimiser moments, feature-firing counters
        trainer.json           step, tokens, configs, optimiser param groups, tensor keys
        stream_rank0.safetensors / stream_rank0.json   the activation stream of each process
    latest.json                {"checkpoint": "step_000000120"}, replaced atomically

Nested state (dicts/lists of JSON values and tensors) is flattened generically: each tensor is stored under
a dotted key and replaced in the JSON by `{"__tensor__": key}`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from steer.errors import ConfigError, MissingFileError

FORMAT_VERSION = 1
LATEST = "latest.json"
_TENSOR = "__tensor__"


def flatten_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested state into a JSON-able skeleton and a flat `{key: tensor}` dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().cpu().clone().contiguous()
            return {_TENSOR: key}
        if isinstance(obj, dict):
            bad = [k for k in obj if not isinstance(k, (str, int))]
            if bad:
                raise TypeError(f"state dict keys must be str or int, got {bad[:3]} at {key or '<root>'}")
            # int keys (optimiser state) are kept apart so they survive the JSON round trip
            return {
                "__dict__": [[k, walk(v, f"{key}.{k}" if key else str(k))] for k, v in obj.items()],
            }
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (str, int, float, bool)):
            return obj
        raise TypeError(
            f"cannot checkpoint a {type(obj).__name__} at {key or '<root>'}: only tensors and JSON values"
        )

    return walk(state, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            key = skeleton[_TENSOR]
            if key not in tensors:
                raise ValueError(f"checkpoint is missing tensor {key!r}")
            return tensors[key]
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def write_part(folder: Path, name: str, state: Any) -> None:
    """Write one part (`name.safetensors` + `name.json`) of a checkpoint being assembled."""
    skeleton, tensors = flatten_state(state)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    _write_json(folder / f"{name}.json", {"format_version": FORMAT_VERSION, "state": skeleton})


def read_part(folder: Path, name: str) -> Any:
    """Read one part of a checkpoint."""
    meta_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise MissingFileError(
            f"checkpoint {folder} has no part {name!r} ({meta_path.name}, {tensor_path.name})"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{meta_path}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return unflatten_state(meta["state"], load_file(str(tensor_path)))


def staging_dir(ckpt_dir: Path, step: int) -> Path:
    """The temporary folder a checkpoint of `step` is assembled in."""
    return ckpt_dir / f"step_{step:09d}.tmp"


def begin(ckpt_dir: Path, step: int) -> Path:
    """Create a clean staging folder for the checkpoint of `step` (one process only)."""
    tmp = staging_dir(ckpt_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(ckpt_dir: Path, step: int, keep: int = 2) -> Path:
    """Move a fully written staging folder into place, point `latest.json` at it, prune old ones."""
    tmp = staging_dir(ckpt_dir, step)
    final = ckpt_dir / f"step_{step:09d}"
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_json(ckpt_dir / LATEST, {"checkpoint": final.name, "step": step})
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None when there is none."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    folder = ckpt_dir / json.loads(pointer.read_text())["checkpoint"]
    if not folder.is_dir():
        raise MissingFileError(f"{pointer} points at {folder.name}, which does not exist")
    return folder


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())

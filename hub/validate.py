"""Checks on SAE folders and tensors, each failing with a `SAEFormatError` that says what is wrong."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from steer.errors import FastSteerError

# safetensors dtype codes of the floating types an SAE may be stored in.
SAFETENSORS_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class SAEFormatError(FastSteerError, ValueError):
    """An SAE folder or file is missing, malformed or does not fit where it is used."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, with a clear error for a missing or malformed file."""
    if not path.is_file():
        raise SAEFormatError(f"missing file {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEFormatError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def require_keys(cfg: dict[str, Any], keys: Iterable[str], where: str) -> None:
    """Fail when a config lacks one of `keys`."""
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise SAEFormatError(f"{where} lacks required key(s) {', '.join(missing)}")


def check_tensor_names(found: Iterable[str], expected: Iterable[str], where: str) -> None:
    """The file holds exactly the expected tensors: no missing one, no extra one."""
    found_set, expected_set = set(found), set(expected)
    missing = sorted(expected_set - found_set)
    extra = sorted(found_set - expected_set)
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensor(s) {', '.join(extra)}")
    if problems:
        raise SAEFormatError(
            f"{where}: {'; '.join(problems)} (expected exactly {', '.join(sorted(expected_set))})"
        )


def check_tensor_shape(name: str, shape: Iterable[int], expected: tuple[int, ...], where: str) -> None:
    shape = tuple(shape)
    if shape != expected:
        raise SAEFormatError(f"{where}: tensor {name} has shape {list(shape)}, expected {list(expected)}")


def check_tensor_dtype(name: str, st_dtype: str, expected: str | None, where: str) -> str:
    """A safetensors dtype code (`F32`, `BF16`...) must be a float type (and `expected`, when given).

    Returns the torch dtype name of the stored tensor.
    """
    stored = SAFETENSORS_FLOAT_DTYPES.get(st_dtype)
    if stored is None:
        raise SAEFormatError(
            f"{where}: tensor {name} is stored as {st_dtype}; SAE weights must be one of "
            f"{', '.join(SAFETENSORS_FLOAT_DTYPES)}"
        )
    if expected is not None and stored != expected:
        raise SAEFormatError(
            f"{where}: tensor {name} is stored as {stored} but cfg.json says dtype={expected}"
        )
    return stored


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise SAEFormatError(f"{where}: tensor {name} has {bad} NaN/inf value(s) (dtype {tensor.dtype})")


def check_d_in(d_in: int, expected_d_in: int | None, where: str) -> None:
    """The SAE input width must equal the width of the model layer it is attached to."""
    if expected_d_in is not None and d_in != expected_d_in:
        raise SAEFormatError(
            f"{where}: the SAE reads vectors of width d_in={d_in}, but the model layer it is attached to "
            f"has width (hidden_size) {expected_d_in}; this SAE was trained for a different model"
        )

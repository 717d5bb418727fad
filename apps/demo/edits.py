"""The rows of the intervention table (feature, op, strength, positions) and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from apps.demo.settings import DemoInputError
from steer.spec import OPS, POSITION_MODES

EDIT_HEADERS = ["feature", "op", "strength", "positions"]


@dataclass(frozen=True)
class EditRow:
    """One feature edit as the page shows it."""

    feature: int
    op: str
    strength: float
    positions: str = "special"

    def as_list(self) -> list:
        return [self.feature, self.op, self.strength, self.positions]


def parse_rows(table: Any) -> list[EditRow]:
    """Rows of the page's table (list of lists, a pandas frame or dicts) as EditRows; blank rows skipped."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):  # pandas DataFrame
        table = table.values.tolist()
    if isinstance(table, dict) and "data" in table:
        table = table["data"]
    rows = []
    for i, raw in enumerate(table, start=1):
        if isinstance(raw, dict):
            raw = [raw.get(h) for h in EDIT_HEADERS]
        cells = list(raw) + [None] * (4 - len(raw))
        if all(c in (None, "") for c in cells[:4]):
            continue
        feature, op, strength, positions = cells[:4]
        rows.append(
            EditRow(
                feature=_as_int(feature, f"row {i}: feature"),
                op=str(op or "add").strip().lower(),
                strength=_as_float(strength if strength not in (None, "") else 0.0, f"row {i}: strength"),
                positions=str(positions or "special").strip().lower(),
            )
        )
    return rows


def validate_rows(rows: list[EditRow], d_sae: int, max_strength: float, max_edits: int) -> list[EditRow]:
    """The rows, or a DemoInputError naming the first bad one and what is expected."""
    if len(rows) > max_edits:
        raise DemoInputError(f"at most {max_edits} feature edits at once, got {len(rows)}")
    for i, row in enumerate(rows, start=1):
        if not 0 <= row.feature < d_sae:
            raise DemoInputError(
                f"row {i}: unknown feature id {row.feature}; this SAE has features 0 to {d_sae - 1}"
            )
        if row.op not in OPS:
            raise DemoInputError(f"row {i}: unknown op {row.op!r}; expected one of {', '.join(OPS)}")
        if row.positions not in POSITION_MODES:
            raise DemoInputError(
                f"row {i}: unknown positions {row.positions!r}; expected one of {', '.join(POSITION_MODES)}"
            )
        if not math.isfinite(row.strength) or abs(row.strength) > max_strength:
            raise DemoInputError(
                f"row {i}: strength {row.strength} is out of range; expected between "
                f"-{max_strength} and {max_strength} for this layer"
            )
    return rows


def _as_int(value: Any, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise DemoInputError(f"{what} must be a whole number, got {value!r}")
    return int(number)


def _as_float(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{what} must be a number, got {value!r}") from None

"""The records of Neuronpedia's bulk import, written down once (`SCHEMAS`), checked one by one (`validate`),
and read back (`read_export`).

Layout (`../shared/research/sae_formats.md` §3.4, the files SAEDashboard's `neuronpedia_export.py` writes and
Neuronpedia's admin import reads): `{out}/{modelId}/{sourceId}/` with `model.jsonl`, `release.jsonl`,
`sourceset.jsonl`, `source.jsonl` (one record each) and `features/`, `activations/`, `explanations/`, each in
`batch-N.jsonl.gz` files of at most `BATCH_FEATURES` features. `sourceId` is `{layer}-{sourceSetName}`.
The limits are Neuronpedia's (those of its upload API, which writes the same rows): index 0..1e7, density and
fractions 0..1, at most 20 top / bottom logits, at most 1024 tokens per activation with as many values, and
explanation texts of 1..512 characters.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.errors import FastSteerError

BATCH_FEATURES = 1024
MAX_INDEX = 10_000_000
MAX_LOGITS = 20
MAX_TOKENS = 1024
MAX_EXPLANATION_CHARS = 512
ID = re.compile(r"[a-z0-9][a-z0-9._-]*")
BATCHED = ("features", "activations", "explanations")
SINGLE = ("model", "release", "sourceset", "source")


class NeuronpediaSchemaError(FastSteerError, ValueError):
    """A record that does not fit Neuronpedia's import schema; the message names the record and the field."""


@dataclass(frozen=True)
class Field:
    """One field of a record: its kind and limits."""

    kind: str
    """str | id | int | number | bool | index (a string holding an int 0..MAX_INDEX) | strings | numbers
    | scores (a list of {value, explanationScoreTypeName, explanationScoreModelName})."""
    low: float | None = None
    high: float | None = None
    max_items: int | None = None
    same_length_as: str | None = None
    max_chars: int | None = None
    nullable: bool = False


SCHEMAS: dict[str, dict[str, Field]] = {
    "model": {
        "id": Field("id"),
        "displayName": Field("str"),
        "instruct": Field("bool"),
        "creatorId": Field("str"),
    },
    "release": {
        "name": Field("id"),
        "description": Field("str"),
        "descriptionShort": Field("str"),
        "urls": Field("strings"),
        "creatorName": Field("str"),
        "creatorNameShort": Field("str"),
        "creatorId": Field("str"),
        "createdAt": Field("str"),
    },
    "sourceset": {
        "modelId": Field("id"),
        "name": Field("id"),
        "creatorId": Field("str"),
        "description": Field("str"),
        "releaseName": Field("id"),
        "visibility": Field("str"),
    },
    "source": {
        "id": Field("id"),
        "modelId": Field("id"),
        "setName": Field("id"),
        "hfRepoId": Field("str", nullable=True),
        "hfFolderId": Field("str", nullable=True),
        "saelensRelease": Field("str", nullable=True),
        "saelensSaeId": Field("str", nullable=True),
        "dataset": Field("str"),
        "num_prompts": Field("int", low=0),
        "num_tokens_in_prompt": Field("int", low=0),
    },
    "features": {
        "modelId": Field("id"),
        "layer": Field("id"),
        "index": Field("index"),
        "maxActApprox": Field("number", low=0),
        "frac_nonzero": Field("number", low=0, high=1),
        "pos_str": Field("strings", max_items=MAX_LOGITS),
        "pos_values": Field("numbers", same_length_as="pos_str"),
        "neg_str": Field("strings", max_items=MAX_LOGITS),
        "neg_values": Field("numbers", same_length_as="neg_str"),
        "freq_hist_data_bar_heights": Field("numbers"),
        "freq_hist_data_bar_values": Field("numbers", same_length_as="freq_hist_data_bar_heights"),
        "logits_hist_data_bar_heights": Field("numbers"),
        "logits_hist_data_bar_values": Field("numbers", same_length_as="logits_hist_data_bar_heights"),
    },
    "activations": {
        "id": Field("str"),
        "modelId": Field("id"),
        "layer": Field("id"),
        "index": Field("index"),
        "tokens": Field("strings", max_items=MAX_TOKENS),
        "values": Field("numbers", same_length_as="tokens"),
        "maxValue": Field("number"),
        "maxValueTokenIndex": Field("int", low=0),
        "minValue": Field("number"),
        "binMin": Field("number"),
        "binMax": Field("number"),
        "binContains": Field("number", low=0, high=1),
        "qualifyingTokenIndex": Field("int", low=0),
        "creatorId": Field("str"),
    },
    "explanations": {
        "modelId": Field("id"),
        "layer": Field("id"),
        "index": Field("index"),
        "description": Field("str", max_chars=MAX_EXPLANATION_CHARS),
        "typeName": Field("str"),
        "explanationModelName": Field("str"),
        "scores": Field("scores"),
    },
}


def validate(kind: str, record: Any, where: str) -> None:
    """Raise `NeuronpediaSchemaError` naming `where` and the field unless `record` fits `SCHEMAS[kind]`."""
    schema = SCHEMAS[kind]
    if not isinstance(record, dict):
        raise NeuronpediaSchemaError(
            f"{where}: a {kind} record must be an object, got {type(record).__name__}"
        )
    missing, unknown = sorted(set(schema) - set(record)), sorted(set(record) - set(schema))
    if missing or unknown:
        raise NeuronpediaSchemaError(
            f"{where}: a {kind} record lacks {missing} / has unknown fields {unknown}"
        )
    for name, spec in schema.items():
        problem = _check(spec, record[name], record)
        if problem:
            raise NeuronpediaSchemaError(f"{where}: field '{name}' {problem}")
    if kind == "activations" and record["maxValueTokenIndex"] >= len(record["tokens"]):
        raise NeuronpediaSchemaError(
            f"{where}: field 'maxValueTokenIndex' is {record['maxValueTokenIndex']}, past its "
            f"{len(record['tokens'])} tokens"
        )


def _check(spec: Field, value: Any, record: dict[str, Any]) -> str | None:
    """What is wrong with `value`, or None."""
    if value is None:
        return None if spec.nullable else "must not be null"
    kind = spec.kind
    if kind in ("str", "id"):
        if not isinstance(value, str) or not value:
            return f"must be a non-empty string, got {value!r}"
        if kind == "id" and not ID.fullmatch(value):
            return f"must be lower-case letters, digits, '.', '_' or '-', got {value!r}"
        if spec.max_chars is not None and len(value) > spec.max_chars:
            return f"has {len(value)} characters, at most {spec.max_chars}"
        return None
    if kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if kind == "index":
        if not (isinstance(value, str) and value.isdigit() and int(value) <= MAX_INDEX):
            return f"must be a feature index 0..{MAX_INDEX} written as a string, got {value!r}"
        return None
    if kind in ("int", "number"):
        ok = _is_number(value) and (kind == "number" or isinstance(value, int))
        if not ok:
            return f"must be {'an integer' if kind == 'int' else 'a finite number'}, got {value!r}"
        return _range(spec, value)
    if kind == "scores":
        return _scores(value)
    if not isinstance(value, list):
        return f"must be a list, got {type(value).__name__}"
    if spec.max_items is not None and len(value) > spec.max_items:
        return f"has {len(value)} items, at most {spec.max_items}"
    if spec.same_length_as is not None and len(value) != len(record.get(spec.same_length_as) or []):
        return f"has {len(value)} items but '{spec.same_length_as}' has {len(record.get(spec.same_length_as) or [])}"
    item_ok = (lambda v: isinstance(v, str)) if kind == "strings" else _is_number
    bad = next((i for i, v in enumerate(value) if not item_ok(v)), None)
    if bad is not None:
        return (
            f"item {bad} must be a {'string' if kind == 'strings' else 'finite number'}, got {value[bad]!r}"
        )
    return None


def _range(spec: Field, value: float) -> str | None:
    if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
        return f"is {value}, outside [{spec.low}, {spec.high}]"
    return None


def _scores(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"must be a list of scores, got {type(value).__name__}"
    for i, score in enumerate(value):
        keys = {"value", "explanationScoreTypeName", "explanationScoreModelName"}
        if not isinstance(score, dict) or set(score) != keys:
            return f"item {i} must be an object with exactly {sorted(keys)}, got {score!r}"
        if not _is_number(score["value"]):
            return f"item {i}: value must be a finite number, got {score['value']!r}"
        for key in keys - {"value"}:
            if not isinstance(score[key], str) or not score[key]:
                return f"item {i}: {key} must be a non-empty string, got {score[key]!r}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_export(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every record of an export's `{modelId}/{sourceId}` folder by kind, each validated (an error names
    the file, the line and the field); batched kinds in batch order."""
    folder = Path(folder)
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in SINGLE:
        out[kind] = _read_lines(folder / f"{kind}.jsonl", kind, gzipped=False)
    for kind in BATCHED:
        batches = sorted(
            (folder / kind).glob("batch-*.jsonl.gz"), key=lambda p: int(p.name.split("-")[1].split(".")[0])
        )
        out[kind] = [r for path in batches for r in _read_lines(path, kind, gzipped=True)]
    return out


def _read_lines(path: Path, kind: str, gzipped: bool) -> list[dict[str, Any]]:
    if not path.is_file():
        raise NeuronpediaSchemaError(f"{path} is missing from the export")
    opener = gzip.open if gzipped else open
    records = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise NeuronpediaSchemaError(f"{path} line {n} is not JSON: {exc}") from None
            validate(kind, record, f"{path} line {n}")
            records.append(record)
    return records

"""`export_neuronpedia`: a run's features, activation examples and explanations as Neuronpedia's bulk-import file
set (`apps.interp.neuronpedia.schema`), every record validated before it is written. No network call.

Per feature: density, max activation and activation histogram (the collection), top / bottom logits (the logit
lens `interp run` computed for its scored features; empty lists for the others), its top windows and decile
samples as activation records (a bin per group: the top windows span [their lowest peak, max], each decile
its edges), and the judge's name (fast-paper) and explanation (detection / fuzzing) with their scores. The
logit histogram is not computed (empty lists). Descriptions over 512 characters are cut to 512.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apps.interp.neuronpedia.schema import BATCH_FEATURES, MAX_EXPLANATION_CHARS, validate
from apps.interp.results import RunResults
from steer.errors import ConfigError, OutputExistsError
from train.interp.examples import FeatureExamples, Window


@dataclass
class NeuronpediaConfig:
    """One `fast-steer interp export-neuronpedia`."""

    sae: str
    """The SAE folder."""
    run_dir: Path
    """The --out folder of `fast-steer interp run`."""
    out: Path
    """Exports folder: the files go to OUT/<modelId>/<sourceId>/ (replaced when it holds an earlier export)."""
    model_id: str | None = None
    """Neuronpedia model id (default: from the SAE's model_name, e.g. smollm2-135m-instruct)."""
    source_set: str | None = None
    """Source set name; the source is `<layer>-<source_set>` (default: fast-steer-<method>-<width>)."""
    creator: str = "fast-steer"
    """creatorId / creatorName written into the records."""
    features: list[int] | None = None
    """The features to export (each must have fired); None: every feature that fired."""


def export_neuronpedia(cfg: NeuronpediaConfig) -> Path:
    """Write the export (see the module docstring); its `<modelId>/<sourceId>` folder."""
    run = RunResults.open(cfg.sae, cfg.run_dir)
    ids = _ids(run, cfg)
    target = cfg.out / ids["model"] / ids["source"]
    if target.exists() and not (target / "source.jsonl").is_file():
        raise OutputExistsError(f"{target} exists and is not a Neuronpedia export; choose another --out")
    features = run.select(cfg.features)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(run, ids, cfg, features, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _ids(run: RunResults, cfg: NeuronpediaConfig) -> dict[str, str]:
    """modelId, source set name and sourceId (`{layer}-{set}`)."""
    from hub.default_model import DEFAULT_HUB_ID

    meta = run.sae.metadata
    layer = run.sae.layer
    if layer is None:
        raise ConfigError(f"the SAE in {run.sae_folder} names no layer in cfg.json (metadata hook_name)")
    model = cfg.model_id
    if model is None:
        name = meta.get("model_name")
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"the SAE in {run.sae_folder} names no model (metadata model_name): give --model-id"
            )
        model = _slug(DEFAULT_HUB_ID if name == "default" else name.rstrip("/").split("/")[-1])
    width = f"{run.sae.d_sae // 1024}k" if run.sae.d_sae % 1024 == 0 else str(run.sae.d_sae)
    method = str(meta.get("method") or run.sae.cfg.architecture)
    source_set = cfg.source_set or _slug(f"fast-steer-{method}-{width}")
    return {"model": model, "set": source_set, "source": f"{layer}-{source_set}"}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "sae"


def _write(
    run: RunResults, ids: dict[str, str], cfg: NeuronpediaConfig, features: list[int], folder: Path
) -> None:
    settings = run.interp.get("settings") or {}
    collect = (settings.get("collection") or {}).get("settings") or {}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    model, source, set_name = ids["model"], ids["source"], ids["set"]
    single = {
        "model": {
            "id": model,
            "displayName": str(run.sae.metadata.get("model_name") or model),
            "instruct": True,
            "creatorId": cfg.creator,
        },
        "release": {
            "name": set_name,
            "description": f"SAE {run.sae_folder.name} ({run.sae.cfg.architecture}, {run.sae.d_sae} features), "
            f"exported by fast-steer from {run.run_dir}",
            "descriptionShort": f"fast-steer {set_name}",
            "urls": [],
            "creatorName": cfg.creator,
            "creatorNameShort": cfg.creator,
            "creatorId": cfg.creator,
            "createdAt": now,
        },
        "sourceset": {
            "modelId": model,
            "name": set_name,
            "creatorId": cfg.creator,
            "description": f"{run.sae.cfg.architecture} SAE, {run.sae.d_sae} features",
            "releaseName": set_name,
            "visibility": "UNLISTED",
        },
        "source": {
            "id": source,
            "modelId": model,
            "setName": set_name,
            "hfRepoId": None,
            "hfFolderId": None,
            "saelensRelease": None,
            "saelensSaeId": None,
            "dataset": ", ".join(map(str, settings.get("data") or [])) or "unknown",
            "num_prompts": run.collection.n_conversations,
            "num_tokens_in_prompt": int(collect.get("max_len") or 0),
        },
    }
    folder.mkdir(parents=True)
    for kind, record in single.items():
        validate(kind, record, f"{kind}.jsonl line 1")
        (folder / f"{kind}.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    for batch, start in enumerate(range(0, len(features), BATCH_FEATURES)):
        rows: dict[str, list[dict[str, Any]]] = {"features": [], "activations": [], "explanations": []}
        for f in features[start : start + BATCH_FEATURES]:
            for kind, record in _records(run, ids, cfg, f):
                rows[kind].append(record)
        for kind, records in rows.items():
            path = folder / kind / f"batch-{batch}.jsonl.gz"
            for n, record in enumerate(records, 1):
                validate(kind, record, f"{kind}/{path.name} line {n} (feature {record['index']})")
            path.parent.mkdir(exist_ok=True)
            with gzip.open(path, "wt", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _records(
    run: RunResults, ids: dict[str, str], cfg: NeuronpediaConfig, f: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The feature record, its activation records and its explanation records."""
    examples = run.collection.feature(f)
    entry = run.scored.get(f) or {}
    proxies = entry.get("proxies") or {}
    where = {"modelId": ids["model"], "layer": ids["source"], "index": str(f)}
    promoted, suppressed = proxies.get("promoted") or [], proxies.get("suppressed") or []
    edges = examples.histogram_edges
    yield (
        "features",
        {
            **where,
            "maxActApprox": examples.max_activation,
            "frac_nonzero": examples.density,
            "pos_str": [t for t, _ in promoted],
            "pos_values": [v for _, v in promoted],
            "neg_str": [t for t, _ in suppressed],
            "neg_values": [v for _, v in suppressed],
            "freq_hist_data_bar_heights": [float(c) for c in examples.histogram_counts],
            "freq_hist_data_bar_values": [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)],
            "logits_hist_data_bar_heights": [],
            "logits_hist_data_bar_values": [],
        },
    )
    for k, (window, low, high, share) in enumerate(_groups(examples)):
        values = list(window.activations)
        yield (
            "activations",
            {
                "id": f"{ids['model']}@{ids['source']}@{f}@{k}",
                **{key: where[key] for key in ("modelId", "layer", "index")},
                "tokens": list(window.tokens),
                "values": values,
                "maxValue": max(values),
                "maxValueTokenIndex": values.index(max(values)),
                "minValue": min(values),
                "binMin": low,
                "binMax": high,
                "binContains": share,
                "qualifyingTokenIndex": window.peak,
                "creatorId": cfg.creator,
            },
        )
    judge = run.judge_model or "unknown"
    rubric = entry.get("fast_paper") or {}
    if isinstance(entry.get("name"), str) and entry["name"].strip():
        scores = [] if rubric.get("score") is None else [_score(rubric["score"], "fast-paper", judge)]
        yield "explanations", {**where, **_described(entry["name"], "fast-steer-fast-paper", judge, scores)}
    if isinstance(entry.get("explanation"), str) and entry["explanation"].strip():
        scores = [
            _score(entry[s]["balanced_accuracy"], s, judge)
            for s in ("detection", "fuzzing")
            if isinstance(entry.get(s), dict) and entry[s].get("balanced_accuracy") is not None
        ]
        yield (
            "explanations",
            {**where, **_described(entry["explanation"], "fast-steer-explainer", judge, scores)},
        )


def _groups(examples: FeatureExamples) -> Iterator[tuple[Window, float, float, float]]:
    """(window, bin low, bin high, share of firing tokens in the bin) for the top windows, then each decile."""
    top = examples.top
    if top:
        low = min(w.activations[w.peak] for w in top)
        share = min(len(top) / max(examples.count, 1), 1.0)
        for w in top:
            yield w, low, examples.max_activation, share
    edges = examples.decile_edges
    for q, windows in enumerate(examples.deciles):
        for w in windows:
            yield w, edges[q], edges[q + 1], 1 / len(examples.deciles)


def _described(text: str, type_name: str, judge: str, scores: list[dict[str, Any]]) -> dict[str, Any]:
    if len(text) > MAX_EXPLANATION_CHARS:
        text = text[: MAX_EXPLANATION_CHARS - 1] + "\u2026"
    return {"description": text, "typeName": type_name, "explanationModelName": judge, "scores": scores}


def _score(value: float, scorer: str, judge: str) -> dict[str, Any]:
    return {"value": value, "explanationScoreTypeName": scorer, "explanationScoreModelName": judge}

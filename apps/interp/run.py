"""`run_interp`: collect (or reuse) an SAE's activation examples, score a random sample of its features with a
judge, run the controls, and write `OUT/interp.json` and `OUT/explanations.json` (both written at the end,
each renamed into place: a failed run leaves neither half-written).

`interp.json`:
- `settings`: every choice (protocol, sample, windows, rubric order, test-set sizes, seeds, the collection),
  the judge (endpoint without credentials, model, decoding settings) and the date; never the key.
- `features`: per scored feature its index, name / explanation, scores, proxies and the cache ids of the
  judge answers they came from.
- `summary`: `fast_paper` (histogram, share_4_5, cdf_3 with Wilson CIs, ...), `n_scored`,
  `n_parse_failures`, `detection` / `fuzzing` (balanced_accuracy_median, iqr, auroc_median, share_ge_0_8),
  `proxies` (medians over the sampled features), `controls` (with `random_sae`: the random-direction SAE at
  matched L0, collected, scored and proxied the same way, saved under OUT/random-sae) and `judge_validated`.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apps.interp import controls, detection, fast_paper, metrics, random_sae
from apps.interp.judge import Judge, JudgeConfig
from apps.interp.prompts import ACTIVATION_SCALE
from steer.errors import ConfigError
from steer.sae import SAE
from train.interp.collect import CollectConfig
from train.interp.collection import Collection
from train.interp.examples import FeatureExamples

PROTOCOLS = ("fast-paper", "detection", "fuzzing", "all")
INTERP_FILE = "interp.json"
EXPLANATIONS_FILE = "explanations.json"


@dataclass
class InterpConfig:
    """One `fast-steer interp run`."""

    sae: str
    """The SAE folder."""
    data: list[str]
    """Conversations (JSONL files, folders or an HF id) the examples are collected from."""
    out: Path
    """Folder of interp.json and explanations.json (and, by default, the collections and judge cache)."""
    judge: JudgeConfig
    """The judge endpoint and how it is asked."""
    protocol: str = "all"
    """fast-paper | detection | fuzzing | all, or a comma-separated list (`fast-paper,detection`)."""
    controls: bool = False
    """Also run the controls and give a verdict on the judge."""
    features: int = fast_paper.FEATURES
    """Features sampled at random (with `seed`) among those whose top-5 activations are all > 0."""
    seed: int = 0
    """Seeds the feature sample, the test sets and the controls."""
    reason_first: bool = False
    """Ablation: the rubric asks for reasoning before the score (the paper asks for the score first)."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """How examples are collected (instances, split, model, device)."""
    collection_dir: Path | None = None
    """Folder of collections (default OUT/collections)."""

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocol.split(",") if p.strip() not in PROTOCOLS]
        if unknown or not self.protocol.strip():
            raise ConfigError(
                f"protocol must be one of {', '.join(PROTOCOLS)} or a comma-separated list of them, "
                f"got {self.protocol!r}"
            )
        if self.features < 1:
            raise ConfigError(f"--features must be at least 1, got {self.features}")

    @property
    def protocols(self) -> list[str]:
        """The protocols to run, in the canonical order (`all` expands to every one)."""
        named = {p.strip() for p in self.protocol.split(",")}
        return [p for p in ("fast-paper", *detection.SCORERS) if "all" in named or p in named]


def run_interp(
    cfg: InterpConfig,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, Any]:
    """Score the SAE's features (see the module docstring); the `interp.json` content. `model`/`tokenizer`:
    the already loaded model of `cfg.collect.model` (loaded from it otherwise)."""
    from hub import load_model

    if model is None or tokenizer is None:
        loaded = load_model(cfg.collect.model, dtype=cfg.collect.dtype, device=cfg.collect.device)
        model, tokenizer = loaded.model, loaded.tokenizer
    real = _prepare(cfg, cfg.sae, cfg.features, model, tokenizer)
    baseline = _baseline(cfg, real, model, tokenizer) if cfg.controls else None
    judge = Judge(cfg.judge)
    scored = asyncio.run(_score(cfg, judge, real, baseline))
    result = _result(cfg, judge, real, scored)
    cfg.out.mkdir(parents=True, exist_ok=True)
    _write_json(cfg.out / INTERP_FILE, result)
    _write_json(cfg.out / EXPLANATIONS_FILE, _explanations(cfg, result["features"]))
    return result


@dataclass
class _Prepared:
    """One SAE's collection, sampled features, detection splits and proxies (what the judge is asked about)."""

    sae: SAE
    collection: Collection
    chosen: list[FeatureExamples]
    splits: list[detection.Split]
    proxies: dict[int, dict[str, Any]]


def _prepare(
    cfg: InterpConfig, folder: str | Path, k: int, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> _Prepared:
    """Collect (or reuse) the SAE in `folder`, sample `k` features, build their test sets and proxies."""
    from hub.sae_io import load_sae
    from train.interp.collect import collect_examples
    from train.interp.proxies import feature_proxies

    collection = collect_examples(
        folder,
        cfg.data,
        cfg.collection_dir or cfg.out / "collections",
        cfg.collect,
        model=model,
        tokenizer=tokenizer,
    )
    chosen = fast_paper.sample_features(collection.live_features().tolist(), collection.feature, k, cfg.seed)
    sae = load_sae(folder, device=next(model.parameters()).device)
    proxies = {
        p.feature: asdict(p)
        for p in feature_proxies(
            collection, sae, [f.feature for f in chosen], model=model, tokenizer=tokenizer
        )
    }
    splits = (
        [
            detection.split(
                f,
                collection.negatives(f.feature, 3 * detection.RANDOM_NEGATIVES, cfg.seed),
                collection.hard_negatives(
                    f.feature,
                    detection.HARD_NEGATIVES,
                    cfg.seed,
                    neighbour=proxies[f.feature]["nearest_feature"],
                ),
                cfg.seed,
            )
            for f in chosen
        ]
        if set(cfg.protocols) & set(detection.SCORERS)
        else []
    )
    return _Prepared(sae, collection, chosen, splits, proxies)


def _baseline(
    cfg: InterpConfig, real: _Prepared, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> _Prepared:
    """The random-direction SAE at matched L0 (`apps.interp.random_sae`), prepared like the real one, with as
    many features."""
    folder = random_sae.baseline_sae(cfg.sae, real.sae, real.collection, model, cfg.out, cfg.seed)
    try:
        return _prepare(cfg, folder, len(real.chosen), model, tokenizer)
    except ConfigError as err:
        raise ConfigError(f"the random-direction baseline SAE in {folder}: {err}") from None


async def _score(
    cfg: InterpConfig, judge: Judge, real: _Prepared, baseline: _Prepared | None
) -> dict[str, Any]:
    """Every protocol asked for, then the controls (the random-direction baseline scored the same way)."""
    out = await _protocols(cfg, judge, real)
    if cfg.controls:
        base = await _protocols(cfg, judge, baseline) if baseline is not None else None
        out["controls"] = await _controls(cfg, judge, real, out, baseline, base)
    return out


async def _protocols(cfg: InterpConfig, judge: Judge, prepared: _Prepared) -> dict[str, Any]:
    """The protocols asked for, on one SAE's sampled features."""
    out: dict[str, Any] = {}
    if "fast-paper" in cfg.protocols:
        items = [fast_paper.rubric_item(f) for f in prepared.chosen]
        out["fast-paper"] = await fast_paper.score_items(judge, items, cfg.reason_first)
    if prepared.splits:
        out["explanations"] = await detection.explain(judge, prepared.splits)
        explained = {f: e.text for f, e in out["explanations"].items()}
        for scorer in detection.SCORERS:
            if scorer in cfg.protocols:
                out[scorer] = await detection.classify(judge, scorer, prepared.splits, explained, cfg.seed)
    return out


async def _controls(
    cfg: InterpConfig,
    judge: Judge,
    real: _Prepared,
    scored: dict[str, Any],
    baseline: _Prepared | None,
    baseline_scored: dict[str, Any] | None,
) -> dict[str, Any]:
    seed = cfg.seed + 1
    chosen, splits = real.chosen, real.splits
    items = [fast_paper.rubric_item(f) for f in chosen]
    explained = {f: e.text for f, e in scored.get("explanations", {}).items()}
    found: dict[str, Any] = {}
    if splits and sum(e is not None for e in explained.values()) >= 2:
        shuffled = await detection.classify(
            judge, "detection", splits, controls.shuffled(explained, seed), cfg.seed
        )
        found["shuffled_summary"] = detection.summarise(shuffled)
    if "fast-paper" in scored and len(chosen) >= fast_paper.TOP_K:
        real_scores = scored["fast-paper"]
        chimera = await fast_paper.score_items(
            judge, controls.chimeras(chosen, len(chosen), seed), cfg.reason_first
        )
        permuted = await fast_paper.score_items(judge, controls.permuted(items, seed), cfg.reason_first)
        retest = await fast_paper.score_items(
            judge, controls.reordered(items, seed), cfg.reason_first, seed=seed
        )
        found["chimera_summary"] = fast_paper.summarise(chimera)
        found["drop"] = controls.score_drop(real_scores, permuted)
        found["alpha"] = metrics.krippendorff_alpha(
            [[s.score for s in real_scores], [s.score for s in retest]]
        )
    described = {f: e for f, e in explained.items() if e is not None}
    found["fakes"] = await controls.fake_judges(cfg.judge, splits, described, items, cfg.seed)
    ok, missing = _parse_failures(scored)
    found["parse_failure_rate"] = missing / (ok + missing) if ok + missing else None
    report = None
    if baseline is not None and baseline_scored is not None:
        report = _baseline_report(real, baseline, baseline_scored)
        found["random_sae_summary"] = report["detection"]
    return {"results": found, "random_sae": report} | controls.verdict(controls.checks(**found))


def _baseline_report(real: _Prepared, baseline: _Prepared, scored: dict[str, Any]) -> dict[str, Any]:
    """The random-direction baseline: its folder, how well its L0 matched, its summaries and proxies."""
    stats = baseline.collection.manifest["stats"]
    summaries = {
        "fast_paper": fast_paper.summarise(scored["fast-paper"]) if "fast-paper" in scored else None,
        **_scorer_summaries(scored),
    }
    return {
        "folder": baseline.collection.manifest["sae"]["folder"],
        "collection": baseline.collection.manifest["key"],
        "l0": random_sae.matched(real.collection.manifest["stats"]["mean_l0"], stats["mean_l0"]),
        "live_features": stats["live_features"],
        "feature_indices": [f.feature for f in baseline.chosen],
        **summaries,
        "proxies": metrics.proxy_medians(list(baseline.proxies.values())),
        "features": _features(baseline.chosen, scored, baseline.proxies),
    }


def _scorer_summaries(scored: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Each scorer's summary, with `n_unexplained`: features left out because their explanation could not
    be parsed (so a judge that never explains shows as such, not as an empty success)."""
    unexplained = sum(e.text is None for e in scored.get("explanations", {}).values())
    return {
        s: detection.summarise(scored[s]) | {"n_unexplained": unexplained} if s in scored else None
        for s in detection.SCORERS
    }


def _parse_failures(scored: dict[str, Any]) -> tuple[int, int]:
    """(answers parsed, answers missing) over the protocols' judge answers (controls not counted)."""
    ok = missing = 0
    for score in scored.get("fast-paper", []):
        ok, missing = ok + (score.score is not None), missing + (score.score is None)
    for explanation in scored.get("explanations", {}).values():
        ok, missing = ok + (explanation.text is not None), missing + (explanation.text is None)
    for scorer in detection.SCORERS:
        for result in scored.get(scorer, []):
            ok, missing = ok + len(result.labels) - result.n_missing, missing + result.n_missing
    return ok, missing


def _features(
    chosen: list[FeatureExamples], scored: dict[str, Any], proxies: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One entry per scored feature: index, name / explanation, scores, proxies, cache ids."""
    features = []
    rubric = {s.key: s for s in scored.get("fast-paper", [])}
    explanations = scored.get("explanations", {})
    by_scorer = {s: {r.feature: r for r in scored.get(s, [])} for s in detection.SCORERS}
    for f in chosen:
        entry: dict[str, Any] = {
            "feature": f.feature,
            "density": f.density,
            "max_activation": f.max_activation,
        }
        if (score := rubric.get(f"feature:{f.feature}")) is not None:
            entry["name"] = score.name
            entry["fast_paper"] = score.as_dict()
        if (explanation := explanations.get(f.feature)) is not None:
            entry["explanation"] = explanation.text
            entry["explanation_cache_id"] = explanation.cache_id
        for scorer in detection.SCORERS:
            if (result := by_scorer[scorer].get(f.feature)) is not None:
                entry[scorer] = result.as_dict()
        entry["proxies"] = proxies.get(f.feature)
        features.append(entry)
    return features


def _result(cfg: InterpConfig, judge: Judge, real: _Prepared, scored: dict[str, Any]) -> dict[str, Any]:
    features = _features(real.chosen, scored, real.proxies)
    ok, missing = _parse_failures(scored)
    summary: dict[str, Any] = {
        "fast_paper": fast_paper.summarise(scored["fast-paper"]) if "fast-paper" in scored else None,
        "n_scored": ok,
        "n_parse_failures": missing,
        "parse_failure_rate": missing / (ok + missing) if ok + missing else None,
    }
    summary |= _scorer_summaries(scored)
    summary["proxies"] = metrics.proxy_medians(list(real.proxies.values()))
    summary["controls"] = scored.get("controls")
    summary["judge_validated"] = scored["controls"]["judge_validated"] if "controls" in scored else None
    summary["judge_stats"] = judge.stats.as_dict()
    return {
        "settings": _settings(cfg, real.collection.manifest, real.chosen),
        "features": features,
        "summary": summary,
    }


def _settings(cfg: InterpConfig, manifest: dict[str, Any], chosen: list[FeatureExamples]) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "sae": cfg.sae,
        "data": list(cfg.data),
        "protocols": cfg.protocols,
        "controls": cfg.controls,
        "seed": cfg.seed,
        "features": cfg.features,
        "feature_indices": [f.feature for f in chosen],
        "feature_selection": f"uniform random (seed {cfg.seed}) among live features whose top "
        f"{fast_paper.TOP_K} windows all peak above 0",
        "collection": {
            "folder": manifest.get("key"),
            "settings": asdict(cfg.collect),
            "sae": manifest.get("sae"),
            "data": manifest.get("data"),
            "stats": manifest.get("stats"),
        },  # fmt: skip
        "fast_paper": {
            "top_k": fast_paper.TOP_K,
            "window_radius": fast_paper.RADIUS,
            "format": "token<TAB>activation per line, special tokens literal, \\n \\t \\r escaped",
            "activation_scale": ACTIVATION_SCALE,
            "answer": "[[score]] then [[name]]"
            + (", reasoning first (ablation)" if cfg.reason_first else ", no reasoning"),
            "reason_first": cfg.reason_first,
            "feature_index_shown": False,
            "expected_score": "sum p(d) d over the digits 1-5 among the top log-probs at the score's position",
        },
        "detection": {
            "train": f"{detection.TRAIN_TOP} top + {detection.TRAIN_PER_DECILE} per decile",
            "test_positives_per_decile": detection.TEST_PER_DECILE,
            "random_negatives": detection.RANDOM_NEGATIVES,
            "hard_negatives": detection.HARD_NEGATIVES,
            "hard_negative_sources": "half on the feature's top peak tokens where it is 0, half on the decoder-nearest "
            "feature's strongest activations where it is 0, then special tokens",
            "disjoint": "test windows share no conversation with the explainer's",
            "window_radius": detection.RADIUS,
            "per_call": 1,
            "fuzzing_negatives": "as many random tokens marked as positives have firing tokens on average",
        },
        "judge": cfg.judge.settings(),
    }


def _explanations(cfg: InterpConfig, features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`{feature, label, score, scorer, judge_model}` per feature and scorer."""
    out = []
    for f in features:
        if "fast_paper" in f:
            out.append(
                {
                    "feature": f["feature"],
                    "label": f["name"],
                    "score": f["fast_paper"]["score"],
                    "scorer": "fast-paper",
                }
            )
        for scorer in detection.SCORERS:
            if scorer in f and f.get("explanation") is not None:
                out.append(
                    {
                        "feature": f["feature"],
                        "label": f["explanation"],
                        "score": f[scorer]["balanced_accuracy"],
                        "scorer": scorer,
                    }
                )
    return [e | {"judge_model": cfg.judge.model} for e in out]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)

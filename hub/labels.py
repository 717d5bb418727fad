"""Feature labels that travel with an SAE: the one reader and writer of `SAE_FOLDER/explanations.json`, the
default labelling, and the lexical search over labels.

The file holds several labellings side by side, one per judge model and scorer:

    {"format": "fast-steer-labels", "version": 1,
     "labellings": [{"judge_model": "gpt-x", "scorer": "fast-paper", "date": "2026-12-06T10:00:00+00:00",
                     "source": "runs/interp", "score_range": [1, 5], "judge_validated": true | false | null,
                     "features": [{"feature": 3, "label": "capital cities", "explanation": "..." | null,
                                   "score": 4 | null, "density": 0.002 | null}]}],
     "notes": ["2026-12-06T...: replaced ..."]}

`score_range` is (chance or worst, best) of the scorer's score, so labellings of different scorers compare.
Storing a labelling replaces only the one of the same judge model and scorer, and says so in `notes`; nothing
else is ever overwritten. The default labelling is the most trusted, then best-scored one (`Labelling.rank`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from hub.formats import parse_folder
from hub.validate import SAEFormatError
from steer.errors import ConfigError, MissingFileError

LABELS_FILE = "explanations.json"
FORMAT = "fast-steer-labels"
VERSION = 1
# (chance or worst, best) of each scorer of `fast-steer interp run`: the 1-5 rubric, balanced accuracy.
SCORE_RANGES = {"fast-paper": (1.0, 5.0), "detection": (0.5, 1.0), "fuzzing": (0.5, 1.0)}
RUBRIC = "fast-paper"  # the scorer whose label is a short name; the others' labels are explanations
RUN_INTERP_FILE = "interp.json"  # what `fast-steer interp run` writes beside its explanations.json
# BM25 constants of `Labelling.search` (the usual ones).
BM25_K1 = 1.2
BM25_B = 0.75
_WORD = re.compile(r"[a-z0-9]+")


class LabelsFormatError(SAEFormatError):
    """An explanations.json that cannot be used; the message names the file and the field."""


class LabelsWarning(UserWarning):
    """An SAE folder's explanations.json is malformed: the SAE loads without labels."""


@dataclass(frozen=True)
class FeatureLabel:
    """What one labelling says about one feature."""

    feature: int
    label: str
    explanation: str | None = None
    score: float | None = None
    """The judge's score of this label on its scorer's scale (`Labelling.score_range`); None if unscored."""
    density: float | None = None
    """Share of tokens on which the feature fires (from the run's collection); None if unknown."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "label": self.label,
            "explanation": self.explanation,
            "score": self.score,
            "density": self.density,
        }


@dataclass(frozen=True)
class SearchHit:
    """One search result: the feature, its label, the judge's score, its density and the match score."""

    feature: int
    label: str
    explanation: str | None
    score: float | None
    density: float | None
    match: float
    """The lexical score of the query against label + explanation (see `Labelling.search`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "label": self.label,
            "score": self.score,
            "density": self.density,
            "match": round(self.match, 4),
        }


@dataclass
class Labelling:
    """The labels one judge model gave with one scorer, where they came from, and lookup and search."""

    judge_model: str
    scorer: str
    date: str
    source: str
    """The run folder the labels were read from."""
    score_range: tuple[float, float]
    features: dict[int, FeatureLabel]
    judge_validated: bool | None = None
    """The run's verdict on the judge (its controls); None when no controls were run."""

    def get(self, feature: int) -> str | None:
        """The label of `feature`, or None when this labelling has none."""
        found = self.features.get(feature)
        return None if found is None else found.label

    def quality(self) -> float | None:
        """Mean score over the scored features, mapped to 0 (chance or worst) .. 1 (best); None if none."""
        low, high = self.score_range
        scores = [f.score for f in self.features.values() if f.score is not None]
        if not scores:
            return None
        return sum(min(1.0, max(0.0, (s - low) / (high - low))) for s in scores) / len(scores)

    def rank(self) -> tuple[int, float, str]:
        """Sort key of the default labelling: a judge that passed its controls first (then one not checked,
        then one that failed), then the higher `quality`, then the newer date."""
        trust = {True: 2, None: 1, False: 0}[self.judge_validated]
        quality = self.quality()
        return trust, -1.0 if quality is None else quality, self.date

    def describe(self) -> str:
        quality = self.quality()
        shown = "unscored" if quality is None else f"quality {quality:.2f}"
        return f"{self.judge_model} / {self.scorer} ({len(self.features)} features, {shown}, {self.date})"

    def search(self, query: str, limit: int = 10) -> list[SearchHit]:
        """Features whose label + explanation match `query`, best first, at most `limit` (empty query or no
        match: []).

        Score: BM25 over the words (lower-case letters and digits) of label + explanation, each distinct
        query word t adding idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len)) with
        idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)), tf the count of t in the feature's text, len its
        words, N the labelled features, n_t those whose text holds t, k1 = 1.2, b = 0.75. Ties go to the
        higher judge score, then the lower feature index.
        """
        if limit < 1:
            raise ConfigError(f"a search limit must be at least 1, got {limit}")
        postings, lengths = self._index
        if not lengths:
            return []
        avg_len = sum(lengths.values()) / len(lengths) or 1.0
        totals: dict[int, float] = {}
        for term in set(_words(query)):
            holding = postings.get(term, {})
            idf = math.log(1 + (len(lengths) - len(holding) + 0.5) / (len(holding) + 0.5))
            for index, tf in holding.items():
                norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths[index] / avg_len)
                totals[index] = totals.get(index, 0.0) + idf * tf * (BM25_K1 + 1) / (tf + norm)
        hits = []
        for index, total in totals.items():  # every total is > 0: idf > 0 and tf >= 1
            f = self.features[index]
            hits.append(SearchHit(index, f.label, f.explanation, f.score, f.density, total))
        hits.sort(key=lambda h: (-h.match, -(h.score if h.score is not None else -math.inf), h.feature))
        return hits[:limit]

    @cached_property
    def _index(self) -> tuple[dict[str, dict[int, int]], dict[int, int]]:
        """The search index, built once: word -> {feature: count}, and each feature's number of words."""
        postings: dict[str, dict[int, int]] = {}
        lengths: dict[int, int] = {}
        for index, f in self.features.items():
            words = Counter(_words(f"{f.label} {f.explanation or ''}"))
            lengths[index] = sum(words.values())
            for word, count in words.items():
                postings.setdefault(word, {})[index] = count
        return postings, lengths

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge_model": self.judge_model,
            "scorer": self.scorer,
            "date": self.date,
            "source": self.source,
            "score_range": list(self.score_range),
            "judge_validated": self.judge_validated,
            "features": [self.features[i].to_dict() for i in sorted(self.features)],
        }


@dataclass
class LabelFile:
    """Every labelling of one SAE and the notes of what replaced what."""

    labellings: list[Labelling] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def default(self) -> Labelling | None:
        """The labelling consumers show: the best by `Labelling.rank`; None when there is none."""
        return max(self.labellings, key=Labelling.rank, default=None)

    def add(self, labelling: Labelling) -> str | None:
        """Store `labelling`, replacing only the one of the same judge model and scorer; the note saying what
        it replaced (also kept in `notes`), or None when it replaced nothing."""
        for i, old in enumerate(self.labellings):
            if (old.judge_model, old.scorer) == (labelling.judge_model, labelling.scorer):
                note = (
                    f"{_now()}: replaced the labelling of judge {old.judge_model!r}, scorer {old.scorer!r} "
                    f"(from {old.source}, {old.date}, {len(old.features)} features) by the one from "
                    f"{labelling.source} ({labelling.date}, {len(labelling.features)} features)"
                )
                self.labellings[i] = labelling
                self.notes.append(note)
                return note
        self.labellings.append(labelling)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "labellings": [lab.to_dict() for lab in self.labellings],
            "notes": list(self.notes),
        }


# -- the SAE folder's file --------------------------------------------------------------------
def read_labels(folder: str | Path, d_sae: int | None = None) -> LabelFile | None:
    """The labellings of the SAE in `folder`, or None when it has no explanations.json. Raises
    `LabelsFormatError` naming the file and the field when the file is malformed (or, given `d_sae`, labels
    a feature the SAE does not have)."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelsFormatError(f"{path} is not valid JSON: {exc}") from None
    return _parse_file(data, path, d_sae)


def default_labels(folder: str | Path, d_sae: int | None = None) -> Labelling | None:
    """The default labelling of the SAE in `folder`; None without labels, and None with a `LabelsWarning`
    (naming the file and the field) when its explanations.json is malformed."""
    try:
        found = read_labels(folder, d_sae)
    except LabelsFormatError as exc:
        warnings.warn(f"{exc}; the SAE loads without labels", LabelsWarning, stacklevel=2)
        return None
    return None if found is None else found.default


def write_labels(folder: str | Path, labels: LabelFile) -> Path:
    """Write `labels` to `folder/explanations.json` (renamed into place: never half-written)."""
    path = Path(folder) / LABELS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(labels.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def store_labellings(folder: str | Path, labellings: list[Labelling]) -> tuple[LabelFile, list[str]]:
    """Add `labellings` to the SAE folder's explanations.json (created if absent) and return the file and
    the notes of what they replaced. A malformed existing file is refused, never overwritten."""
    folder = Path(folder)
    d_sae = parse_folder(folder).cfg.d_sae
    for labelling in labellings:
        beyond = [i for i in labelling.features if i >= d_sae]
        if beyond:
            raise LabelsFormatError(
                f"the labels from {labelling.source} name feature(s) {beyond[:5]} but the SAE in {folder} has "
                f"{d_sae} features: were they made for another SAE?"
            )
    labels = read_labels(folder, d_sae) or LabelFile()
    notes = [note for labelling in labellings if (note := labels.add(labelling)) is not None]
    write_labels(folder, labels)
    return labels, notes


# -- a run's output ---------------------------------------------------------------------------
def labellings_from_run(run_dir: str | Path, sae_weights_sha256: str | None = None) -> list[Labelling]:
    """One labelling per judge model and scorer from the folder `fast-steer interp run` wrote: its
    explanations.json (`[{feature, label, score, scorer, judge_model}]`) and interp.json (date, judge
    verdict, densities). A rubric label is a feature's short name; a detection or fuzzing label is an
    explanation, shown under the rubric's name of the same feature when the run has one. With
    `sae_weights_sha256`, a run of another SAE is refused."""
    run_dir = Path(run_dir)
    entries_path, interp_path = run_dir / LABELS_FILE, run_dir / RUN_INTERP_FILE
    for path in (entries_path, interp_path):
        if not path.is_file():
            raise MissingFileError(
                f"no {path.name} in {run_dir}: give the --out folder of `fast-steer interp run`"
            )
    entries, interp = _read_json(entries_path), _read_json(interp_path)
    if not isinstance(entries, list):
        raise LabelsFormatError(
            f"{entries_path} must hold a list of {{feature, label, score, scorer, judge_model}}, got "
            f"{type(entries).__name__}"
        )
    if not isinstance(interp, dict) or not isinstance(interp.get("settings"), dict):
        raise _bad(interp_path, "settings", "must be an object (the run's settings)")
    date = _text(interp["settings"], "date", interp_path, "settings")
    if sae_weights_sha256 is not None:
        made = ((interp["settings"].get("collection") or {}).get("sae") or {}).get("weights_sha256")
        if made is None:
            raise _bad(interp_path, "settings.collection.sae.weights_sha256", "is missing: cannot tell "
                       "whether the run scored this SAE")  # fmt: skip
        if made != sae_weights_sha256:
            raise LabelsFormatError(
                f"{interp_path} scored another SAE (weights sha256 {made[:12]}..., this one "
                f"{sae_weights_sha256[:12]}...): its labels do not belong to this SAE"
            )
    summary = interp.get("summary") if isinstance(interp.get("summary"), dict) else {}
    verdict = summary.get("judge_validated")
    per_feature = {f.get("feature"): f for f in interp.get("features") or [] if isinstance(f, dict)}
    checked = [_run_entry(e, entries_path, f"[{i}]") for i, e in enumerate(entries)]
    rows = [r for r in checked if r["label"] is not None]  # null: the judge's answer could not be parsed
    names = {(r["judge_model"], r["feature"]): r["label"] for r in rows if r["scorer"] == RUBRIC}
    grouped: dict[tuple[str, str], dict[int, FeatureLabel]] = {}
    for r in rows:
        density = (per_feature.get(r["feature"]) or {}).get("density")
        if r["scorer"] == RUBRIC:
            explanation = (per_feature.get(r["feature"]) or {}).get("explanation")
            label = r["label"]
        else:
            explanation = r["label"]
            label = names.get((r["judge_model"], r["feature"]), r["label"])
        grouped.setdefault((r["judge_model"], r["scorer"]), {})[r["feature"]] = FeatureLabel(
            r["feature"],
            label,
            explanation if isinstance(explanation, str) else None,
            r["score"],
            float(density) if isinstance(density, (int, float)) and not isinstance(density, bool) else None,
        )
    return [
        Labelling(
            judge_model=judge,
            scorer=scorer,
            date=date,
            source=str(run_dir),
            score_range=SCORE_RANGES.get(scorer, (0.0, 1.0)),
            features=features,
            judge_validated=verdict if isinstance(verdict, bool) else None,
        )
        for (judge, scorer), features in grouped.items()
    ]


def _run_entry(entry: Any, path: Path, at: str) -> dict[str, Any]:
    """One `{feature, label, score, scorer, judge_model}` of a run, checked."""
    if not isinstance(entry, dict):
        raise _bad(path, at, f"must be an object, got {type(entry).__name__}")
    return {
        "feature": _feature_index(entry, path, at),
        "label": _text(entry, "label", path, at, optional=True),
        "score": _number(entry, "score", path, at),
        "scorer": _text(entry, "scorer", path, at),
        "judge_model": _text(entry, "judge_model", path, at),
    }


# -- parsing: every error names the file and the field ----------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelsFormatError(f"{path} is not valid JSON: {exc}") from None


def _parse_file(data: Any, path: Path, d_sae: int | None) -> LabelFile:
    if isinstance(data, list):
        raise LabelsFormatError(
            f"{path} holds a list (the file `fast-steer interp run` writes in its --out folder); an SAE "
            f"folder's labels are an object with format {FORMAT!r}: store a run's labels with "
            "`fast-steer interp label SAE --from RUN_DIR`"
        )
    if not isinstance(data, dict):
        raise LabelsFormatError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise _bad(path, "format", f"must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("version")
    if version != VERSION:
        newer = " (written by a newer fast-steer?)" if isinstance(version, int) and version > VERSION else ""
        raise _bad(path, "version", f"must be {VERSION}, got {version!r}{newer}")
    items = data.get("labellings")
    if not isinstance(items, list):
        raise _bad(path, "labellings", f"must be a list, got {type(items).__name__}")
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _bad(path, "notes", "must be a list of strings")
    labellings = [_parse_labelling(item, path, f"labellings[{i}]", d_sae) for i, item in enumerate(items)]
    seen: set[tuple[str, str]] = set()
    for i, lab in enumerate(labellings):
        if (lab.judge_model, lab.scorer) in seen:
            raise _bad(path, f"labellings[{i}]", f"repeats judge {lab.judge_model!r} with scorer "
                       f"{lab.scorer!r} (one labelling per judge and scorer)")  # fmt: skip
        seen.add((lab.judge_model, lab.scorer))
    return LabelFile(labellings, list(notes))


def _parse_labelling(item: Any, path: Path, at: str, d_sae: int | None) -> Labelling:
    if not isinstance(item, dict):
        raise _bad(path, at, f"must be an object, got {type(item).__name__}")
    span = item.get("score_range")
    if not (isinstance(span, list) and len(span) == 2 and all(map(_is_number, span)) and span[0] < span[1]):
        raise _bad(path, f"{at}.score_range", f"must be [low, high] numbers with low < high, got {span!r}")
    verdict = item.get("judge_validated")
    if verdict is not None and not isinstance(verdict, bool):
        raise _bad(path, f"{at}.judge_validated", f"must be true, false or null, got {verdict!r}")
    rows = item.get("features")
    if not isinstance(rows, list):
        raise _bad(path, f"{at}.features", f"must be a list, got {type(rows).__name__}")
    features: dict[int, FeatureLabel] = {}
    for j, row in enumerate(rows):
        row_at = f"{at}.features[{j}]"
        if not isinstance(row, dict):
            raise _bad(path, row_at, f"must be an object, got {type(row).__name__}")
        index = _feature_index(row, path, row_at)
        if d_sae is not None and index >= d_sae:
            raise _bad(path, f"{row_at}.feature", f"is {index}, but the SAE has {d_sae} features")
        if index in features:
            raise _bad(path, f"{row_at}.feature", f"repeats feature {index}")
        features[index] = FeatureLabel(
            index,
            _text(row, "label", path, row_at),
            _text(row, "explanation", path, row_at, optional=True),
            _number(row, "score", path, row_at),
            _number(row, "density", path, row_at),
        )
    return Labelling(
        judge_model=_text(item, "judge_model", path, at),
        scorer=_text(item, "scorer", path, at),
        date=_text(item, "date", path, at),
        source=_text(item, "source", path, at),
        score_range=(float(span[0]), float(span[1])),
        features=features,
        judge_validated=verdict,
    )


def _bad(path: Path, name: str, problem: str) -> LabelsFormatError:
    return LabelsFormatError(f"{path}: field '{name}' {problem}")


def _text(data: dict[str, Any], key: str, path: Path, at: str, optional: bool = False) -> Any:
    value = data.get(key)
    if optional and value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, _join(at, key), f"must be a non-empty string, got {value!r}")
    return value


def _number(data: dict[str, Any], key: str, path: Path, at: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise _bad(path, _join(at, key), f"must be a finite number or null, got {value!r}")
    return float(value)


def _feature_index(data: dict[str, Any], path: Path, at: str) -> int:
    value = data.get("feature")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(path, _join(at, "feature"), f"must be a feature index (an integer >= 0), got {value!r}")
    return value


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

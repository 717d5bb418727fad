"""The feature table of an SAE: its top features per special token, saved beside it as `features.json`.

Written by the main job (`fast-steer run`) and read by the demo and the server (`GET /v1/saes`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from train.data import DataFormatError
from train.features import FeatureReport

FEATURES_FILE = "features.json"


@dataclass(frozen=True)
class TopFeature:
    """One row of the feature-discovery table."""

    token: str
    feature: int
    mean_max: float


def top_features(report: FeatureReport, per_token: int = 5) -> list[TopFeature]:
    """The first `per_token` features of every token type of a discovery report, as table rows."""
    return [
        TopFeature(entry.token, stat.feature, stat.mean_max_activation)
        for entry in report.token_types
        for stat in entry.top[:per_token]
    ]


def save_top_features(features: list[TopFeature], path: Path) -> None:
    path.write_text(
        json.dumps([asdict(f) for f in features], indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def read_top_features(path: Path) -> list[TopFeature]:
    """Rows written by `save_top_features` (a `DataFormatError` naming the file if it is malformed)."""
    try:
        return [
            TopFeature(str(r["token"]), int(r["feature"]), float(r["mean_max"]))
            for r in json.loads(path.read_text())
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataFormatError(f"{path} is not a feature table written by fast-steer: {exc}") from None

"""Turning command-line SAE references into the demo's SAEs, with their discovered features."""

from __future__ import annotations

import json
from pathlib import Path

from apps.demo.backend import DemoSAE, TopFeature, check_fits
from steer.spec import SAERef, load_sae_reference, sae_ref_name
from train.features import FeatureReport, discover_features

FEATURES_FILE = "features.json"


def load_demo_sae(ref: SAERef, model, name: str | None = None) -> DemoSAE:
    """Load the SAE at `ref` on the model's device and check that it fits the model."""
    sae = load_sae_reference(ref, device=model.device).eval()
    layer = sae.layer
    name = name or sae_ref_name(ref)
    if layer is None:
        raise ValueError(
            f"SAE {name!r} does not say which layer it reads (no residual-stream hook_name in its cfg.json "
            "metadata); the demo needs an SAE on the residual stream after a decoder block"
        )
    check_fits(sae, layer, model, name)
    return DemoSAE(name=name, sae=sae)


def top_features(report: FeatureReport, per_token: int = 5) -> list[TopFeature]:
    """The first `per_token` features of every token type of a discovery report, as table rows."""
    return [
        TopFeature(entry.token, stat.feature, stat.mean_max_activation)
        for entry in report.token_types
        for stat in entry.top[:per_token]
    ]


def discover(
    model, tokenizer, demo_sae: DemoSAE, conversations, per_token: int = 5, progress: bool = True
) -> list[TopFeature]:
    """The top `per_token` features per special token of `demo_sae`, by discovery on `conversations`."""
    report = discover_features(
        model, tokenizer, demo_sae.sae, demo_sae.layer, conversations, top_k=per_token, progress=progress
    )
    return top_features(report, per_token)


def save_top_features(features: list[TopFeature], path: Path) -> None:
    path.write_text(
        json.dumps([f.__dict__ for f in features], indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def read_top_features(path: Path) -> list[TopFeature]:
    """Rows written by `save_top_features` (a ValueError naming the file if it is malformed)."""
    try:
        return [
            TopFeature(str(r["token"]), int(r["feature"]), float(r["mean_max"]))
            for r in json.loads(path.read_text())
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a feature table written by fast-steer: {exc}") from None

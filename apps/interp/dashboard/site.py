"""Write the static site: `build_dashboard(DashboardConfig(...))`.

    SITE/index.html        the searchable, sortable feature table (dashboard.js draws it from index-data.js)
    SITE/index-data.js     `window.FS_INDEX = {rows: [[feature, label, rubric, detection, density, special], ...]}`
    SITE/dashboard.js, dashboard.css
    SITE/features/<f>.html one small card per feature
    SITE/site.json         what the site was built from (also marks the folder as a dashboard)

Everything a page loads lies inside SITE and is loaded by a relative `<script src>` / `<link href>`, so the site
works from file:// with no network. The site is written beside SITE and renamed into place; a folder that is
not a dashboard is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from tqdm.auto import tqdm

from apps.colours import ACTIVATION_RGB, SPECIAL_OUTLINE
from apps.interp.dashboard.cards import CardConfig, feature_cards
from apps.interp.dashboard.render import card_body
from apps.interp.results import RunResults
from steer.errors import OutputExistsError
from steer.spec import sae_ref_name

MARKER = "site.json"
FEATURES_DIR = "features"
STATIC = ("dashboard.js",)


@dataclass
class DashboardConfig:
    """One `fast-steer interp dashboard`."""

    sae: str
    """The SAE folder."""
    run_dir: Path
    """The --out folder of `fast-steer interp run` (its interp.json and collection)."""
    out: Path
    """The site's folder (replaced when it holds an earlier dashboard)."""
    features: list[int] | None = None
    """The features to show (each must have fired in the collection); None: every feature that fired."""
    cards: CardConfig = field(default_factory=CardConfig)
    """How much each card shows."""


def build_dashboard(cfg: DashboardConfig, progress: bool = True) -> dict[str, Any]:
    """Write the site (see the module docstring); what `site.json` records."""
    _check_out(cfg.out)
    run = RunResults.open(cfg.sae, cfg.run_dir)
    features = run.select(cfg.features)
    tmp = cfg.out.with_name(f".{cfg.out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / FEATURES_DIR).mkdir(parents=True)
        info = _write(run, features, cfg, tmp, progress)
        shutil.rmtree(cfg.out, ignore_errors=True)
        tmp.replace(cfg.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _write(
    run: RunResults, features: list[int], cfg: DashboardConfig, site: Path, progress: bool
) -> dict[str, Any]:
    settings = run.interp.get("settings") or {}
    name = sae_ref_name(str(run.sae_folder))
    judge = run.judge_model
    has_card = set(features)
    meta = _meta(run, len(features))
    page = Template(_asset("card.html"))
    rows = []
    cards = feature_cards(run, features, cfg.cards)
    for card in tqdm(cards, total=len(features), desc="cards", unit="card", disable=not progress):
        body = card_body(card, judge, name, has_card, cfg.cards)
        title = f"Feature {card.feature}" + (f": {card.label}" if card.label else "") + f" | {name}"
        html = page.substitute(title=escape(title), meta=escape(meta), body=body)
        (site / FEATURES_DIR / f"{card.feature}.html").write_text(html, encoding="utf-8")
        rows.append(card.index_row())
    data = {"sae": name, "rows": rows}
    (site / "index-data.js").write_text(
        "window.FS_INDEX = " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + ";\n",
        encoding="utf-8",
    )
    index = Template(_asset("index.html")).substitute(title=escape(f"Features of {name}"), meta=escape(meta))
    (site / "index.html").write_text(index, encoding="utf-8")
    css = Template(_asset("dashboard.css")).substitute(
        activation_rgb=ACTIVATION_RGB, special_outline=SPECIAL_OUTLINE
    )
    (site / "dashboard.css").write_text(css, encoding="utf-8")
    for static in STATIC:
        (site / static).write_text(_asset(static), encoding="utf-8")
    info = {
        "format": "fast-steer-dashboard",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "sae": str(run.sae_folder),
        "run": str(run.run_dir),
        "run_date": settings.get("date"),
        "judge_model": judge,
        "features": len(features),
        "scored": len(set(run.scored) & has_card),
    }
    (site / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _meta(run: RunResults, n: int) -> str:
    collection = run.collection
    verdict = (run.interp.get("summary") or {}).get("judge_validated")
    judged = {True: "validated", False: "NOT validated", None: "not checked"}.get(verdict, "not checked")
    return (
        f"{n} of {collection.d_sae} features ({len(collection.live_features())} fire); "
        f"{collection.n_conversations} conversations, {collection.n_tokens:,} tokens; "
        f"judge {run.judge_model or 'none'} ({judged}); run of {(run.interp.get('settings') or {}).get('date', '?')}"
    )


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise OutputExistsError(
            f"{out} exists and is not a fast-steer dashboard (no {MARKER}); choose another --out"
        )


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")

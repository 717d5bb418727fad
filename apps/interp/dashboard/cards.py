"""What one feature card shows, gathered from a run (`apps.interp.results.RunResults`): `feature_cards`.

Everything comes from the collection, the SAE and `interp.json`; no model is loaded. The logit lens needs the
model's unembedding, so it is shown where `interp run` computed it (its proxies of the scored features).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from apps.interp.results import RunResults
from hub.registry import feature_url
from steer.spec import Edit, Intervention
from train.interp.examples import Window
from train.interp.proxies import decoder_neighbours, peak_concentration

SCORERS = {
    "fast-paper": "fast_paper",
    "detection": "detection",
    "fuzzing": "fuzzing",
}  # scorer: interp.json key


@dataclass(frozen=True)
class CardConfig:
    """How much one card shows."""

    top: int = 10
    """Top activating contexts shown."""
    per_decile: int = 2
    """Contexts shown per activation decile."""
    before: int = 20
    """Tokens shown before a context's peak."""
    after: int = 6
    """Tokens shown after it."""
    neighbours: int = 5
    """Decoder nearest neighbours listed."""
    block: int = 512
    """Features whose neighbours are computed at once (memory only)."""


@dataclass
class SpecialAssociation:
    """How a feature relates to the chat template's special / role tokens."""

    firing_share: float
    """Share of the tokens it fires on that are special."""
    base_share: float
    """Share of all counted tokens that are special (what `firing_share` would be by chance)."""
    top_peak_share: float
    """Share of its top contexts whose peak is a special token."""
    peak_tokens: list[tuple[str, int, bool]]
    """(token, count, special) of its top contexts' peak tokens, most common first."""


@dataclass
class FeatureCard:
    """Everything one card (and its index row) shows."""

    feature: int
    label: str | None
    explanation: str | None
    scores: dict[str, dict[str, Any]]
    """Per scorer the run's result (fast-paper: score, expected_score, name; detection / fuzzing:
    balanced_accuracy, auroc, n_items)."""
    density: float
    count: int
    max_activation: float
    top: list[Window]
    deciles: list[tuple[float, float, list[Window]]]
    """(low, high, windows) per activation decile, highest first."""
    histogram_edges: list[float]
    histogram_counts: list[int]
    neighbours: list[tuple[int, float]]
    special: SpecialAssociation
    spec: dict[str, Any] | None
    """The intervention of `fast-steer chat --spec` that adds this feature's direction; None when the SAE's
    cfg.json names no layer."""
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    neuronpedia_url: str | None = None
    """The feature's Neuronpedia page where the SAE has a Neuronpedia id (a registered release)."""

    @property
    def rubric(self) -> float | None:
        return (self.scores.get("fast-paper") or {}).get("score")

    @property
    def detection(self) -> float | None:
        return (self.scores.get("detection") or {}).get("balanced_accuracy")

    def index_row(self) -> list[Any]:
        """[feature, label, rubric, detection, density, special share]: one compact row of the index."""
        detection = self.detection
        return [
            self.feature,
            self.label or "",
            self.rubric,
            None if detection is None else round(detection, 3),
            float(f"{self.density:.4g}"),
            round(self.special.top_peak_share, 3),
        ]


def feature_cards(run: RunResults, features: list[int], cfg: CardConfig) -> Iterator[FeatureCard]:
    """The cards of `features` (each must have fired in the run's collection), in order."""
    collection, sae = run.collection, run.sae
    scored = run.scored
    base_share = float(collection.special[collection.measured].mean()) if collection.tokens_counted else 0.0
    with torch.no_grad():
        norms = sae.W_dec.detach().float().norm(dim=-1)
    for start in range(0, len(features), cfg.block):
        block = features[start : start + cfg.block]
        index, cosine = decoder_neighbours(sae, block, cfg.neighbours)
        for row, f in enumerate(block):
            examples = collection.feature(f)
            entry = scored.get(f) or {}
            proxies = entry.get("proxies") or {}
            firing, _ = collection.entries(f)
            _, _, _, top_peak_share = peak_concentration(examples)
            peaks = Counter((w.tokens[w.peak], w.special[w.peak]) for w in examples.top)
            edges = examples.decile_edges
            yield FeatureCard(
                feature=f,
                label=run.label(f),
                explanation=entry.get("explanation"),
                scores={
                    s: _score(entry[key]) for s, key in SCORERS.items() if isinstance(entry.get(key), dict)
                },
                density=examples.density,
                count=examples.count,
                max_activation=examples.max_activation,
                top=examples.top[: cfg.top],
                deciles=[
                    (edges[q], edges[q + 1], examples.deciles[q][: cfg.per_decile])
                    for q in reversed(range(len(examples.deciles)))
                    if examples.deciles[q] and len(edges) > q + 1
                ],
                histogram_edges=examples.histogram_edges,
                histogram_counts=examples.histogram_counts,
                neighbours=list(zip(index[row].tolist(), cosine[row].tolist(), strict=True)),
                special=SpecialAssociation(
                    firing_share=float(collection.special[firing].mean()) if len(firing) else 0.0,
                    base_share=base_share,
                    top_peak_share=top_peak_share,
                    peak_tokens=[(t, n, s) for (t, s), n in peaks.most_common()],
                ),
                spec=_spec(run, f, examples.max_activation * float(norms[f])),
                promoted=[tuple(p) for p in proxies.get("promoted") or []],
                suppressed=[tuple(p) for p in proxies.get("suppressed") or []],
                neuronpedia_url=feature_url(sae.metadata, f),
            )


def _score(result: dict[str, Any]) -> dict[str, Any]:
    """A scorer's result for one feature, without the judge-cache ids."""
    return {k: v for k, v in result.items() if k not in ("cache_id", "cache_ids")}


def _spec(run: RunResults, feature: int, strength: float) -> dict[str, Any] | None:
    """Add the feature's direction at special positions, with the norm it writes at its strongest firing in
    the collection (max activation x decoder row norm); checked by `Intervention` itself."""
    layer = run.sae.layer
    if layer is None:
        return None
    spec = Intervention(
        layer=layer,
        sae=str(run.sae_folder.resolve()),
        edits=[Edit(feature=feature, op="add", strength=float(f"{strength:.4g}"))],
        positions="special",
    )
    spec.check_sae(run.sae)
    return spec.to_dict()

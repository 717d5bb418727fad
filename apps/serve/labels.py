"""Feature labels over HTTP: the labels in `GET /v1/saes`, and `GET /v1/saes/{name}/features?q=TEXT&limit=N`
(each hit with its Neuronpedia page where the SAE has a Neuronpedia id, else null; no network).

Both answer only for the SAEs the server was started with, from the labels their folders carried
(`hub.labels`); a request names an SAE, never a path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apps.serve.errors import APIError
from apps.serve.schemas import Limits
from hub.registry import feature_url

if TYPE_CHECKING:
    from apps.serve.steering import NamedSAE

DEFAULT_SEARCH_LIMIT = 10


def describe_labels(labels: Any) -> dict[str, Any] | None:
    """The default labelling of an SAE as JSON (None without labels): who gave it and every feature's label."""
    if labels is None:
        return None
    return {
        "judge_model": labels.judge_model,
        "scorer": labels.scorer,
        "date": labels.date,
        "judge_validated": labels.judge_validated,
        "score_range": list(labels.score_range),
        "features": [
            {"feature": f.feature, "label": f.label, "score": f.score}
            for f in sorted(labels.features.values(), key=lambda f: f.feature)
        ],
    }


def search_features(
    saes: dict[str, NamedSAE], name: str, query: str, limit_text: str | None, limits: Limits
) -> list[dict[str, Any]]:
    """`[{feature, label, score, density, match, neuronpedia_url}]` of SAE `name` matching `query`, best first
    (an empty query, no match or an SAE without labels: []). 404 for an SAE not loaded; 400 for `q` or `limit`
    out of range."""
    named = saes.get(name)
    if named is None:
        loaded = ", ".join(sorted(saes)) or "none"
        raise APIError(
            404, f"no SAE named {name!r} is loaded here (loaded: {loaded})", "name", "not_found_error"
        )
    if len(query) > limits.max_search_query_chars:
        raise APIError.bad_request(
            f"q is {len(query)} characters long; this server accepts at most {limits.max_search_query_chars}",
            "q",
        )
    limit = _limit(limit_text, limits.max_search_limit)
    labels = named.sae.labels
    if labels is None:
        return []
    meta = named.sae.metadata
    return [
        {**hit.to_dict(), "neuronpedia_url": feature_url(meta, hit.feature)}
        for hit in labels.search(query, limit)
    ]


def _limit(text: str | None, most: int) -> int:
    if text is None:
        return min(DEFAULT_SEARCH_LIMIT, most)
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= most:
        raise APIError.bad_request(f"limit must be an integer from 1 to {most}, got {text!r}", "limit")
    return value

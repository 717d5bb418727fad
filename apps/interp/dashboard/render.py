"""HTML of one feature card (`card_body`), every text escaped: tokens may hold `<`, `&` and quotes."""

from __future__ import annotations

import json
from html import escape

from apps.interp.dashboard.cards import CardConfig, FeatureCard
from train.interp.examples import Window

HIST_WIDTH, HIST_HEIGHT, HIST_PAD = 520, 150, 28


def card_body(card: FeatureCard, judge_model: str | None, server_name: str, has_card: set[int],
              cfg: CardConfig) -> str:  # fmt: skip
    """The card's sections: label (and its Neuronpedia page where known) and scores, statistics and histogram,
    contexts, logit lens, neighbours, special-token association, and how to steer with it."""
    label = card.label or "(no label)"
    parts = [
        f"<h1>Feature {card.feature}</h1>",
        f"<div class='label' id='label'>{_e(label)}</div>",
    ]
    if card.explanation and card.explanation != card.label:
        parts.append(f"<div class='muted'>{_e(card.explanation)}</div>")
    if card.neuronpedia_url:
        url = _e(card.neuronpedia_url)
        parts.append(
            f"<div id='neuronpedia'><a href='{url}' target='_blank' rel='noopener'>Neuronpedia: {url}</a></div>"
        )
    parts += [
        "<div class='columns'>",
        f"<div><h2>Scores</h2>{_scores(card, judge_model)}</div>",
        f"<div><h2>Activations</h2>{_stats(card)}</div>",
        f"<div><h2>Histogram of firing activations</h2>{histogram_svg(card)}</div>",
        "</div>",
        f"<h2>Top contexts</h2><div class='contexts' id='top'>{_contexts(card.top, card.max_activation, cfg)}</div>",
        f"<h2>Contexts by activation decile</h2><div class='contexts' id='deciles'>{_deciles(card, cfg)}</div>",
        "<div class='columns'>",
        f"<div><h2>Logit lens</h2>{_logit_lens(card)}</div>",
        f"<div><h2>Decoder nearest neighbours</h2>{_neighbours(card, has_card)}</div>",
        f"<div><h2>Special-token association</h2>{_special(card)}</div>",
        "</div>",
        f"<h2>Steer with this feature</h2>{_steer(card, server_name)}",
    ]
    return "\n".join(parts)


def token_spans(window: Window, scale: float, cfg: CardConfig) -> str:
    """The window's tokens around its peak: firing tokens as spans with background opacity = activation /
    `scale` and their value as title, special tokens outlined (class `s`), the peak underlined (class `pk`)."""
    lo, hi = max(0, window.peak - cfg.before), min(len(window.tokens), window.peak + cfg.after + 1)
    spans = []
    for i in range(lo, hi):
        act = window.activations[i]
        classes = "t" + (" s" if window.special[i] else "") + (" pk" if i == window.peak else "")
        text = _e(window.tokens[i].replace("\n", "\u21b5").replace("\t", "\u2192"))
        if act > 0:
            alpha = min(act / scale, 1.0) if scale > 0 else 0.0
            spans.append(f'<span class="{classes}" style="--a:{alpha:.2f}" title="{act:.3f}">{text}</span>')
        elif classes != "t":
            spans.append(f'<span class="{classes}">{text}</span>')
        else:  # plain text: a silent, ordinary token needs no span
            spans.append(text)
    return "".join(spans)


def histogram_svg(card: FeatureCard) -> str:
    """An inline SVG bar chart of the feature's activation histogram (firing tokens over [0, max])."""
    counts, edges = card.histogram_counts, card.histogram_edges
    if not counts or not any(counts):
        return "<p class='muted'>No firing tokens.</p>"
    top = max(counts)
    inner_w, inner_h = HIST_WIDTH - 2 * HIST_PAD, HIST_HEIGHT - 2 * HIST_PAD
    width = inner_w / len(counts)
    bars = []
    for i, n in enumerate(counts):
        h = inner_h * n / top
        x, y = HIST_PAD + i * width, HIST_PAD + inner_h - h
        span = f"{edges[i]:.3g}-{edges[i + 1]:.3g}" if len(edges) > i + 1 else ""
        bars.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{max(width - 1, 1):.1f}" height="{h:.1f}">'
            f"<title>{_e(span)}: {n} tokens</title></rect>"
        )
    base = HIST_PAD + inner_h
    axis = (
        f'<line x1="{HIST_PAD}" y1="{base}" x2="{HIST_PAD + inner_w}" y2="{base}" stroke="#888"/>'
        f'<text x="{HIST_PAD}" y="{base + 14}">0</text>'
        f'<text x="{HIST_PAD + inner_w}" y="{base + 14}" text-anchor="end">{card.max_activation:.3g}</text>'
        f'<text x="{HIST_PAD}" y="{HIST_PAD - 8}">{top} tokens (tallest bar)</text>'
        f'<text x="{HIST_PAD + inner_w / 2}" y="{base + 14}" text-anchor="middle">activation</text>'
    )
    return (
        f'<svg class="hist" id="histogram" width="{HIST_WIDTH}" '
        f'height="{HIST_HEIGHT}" role="img" aria-label="activation histogram">{"".join(bars)}{axis}</svg>'
    )


def _contexts(windows: list[Window], scale: float, cfg: CardConfig) -> str:
    if not windows:
        return "<p class='muted'>None.</p>"
    return "".join(
        f"<div class='ctx'><span class='act'>{w.activations[w.peak]:.3f}</span>{token_spans(w, scale, cfg)}</div>"
        for w in windows
    )


def _deciles(card: FeatureCard, cfg: CardConfig) -> str:
    if not card.deciles:
        return "<p class='muted'>None.</p>"
    out = []
    for low, high, windows in card.deciles:
        out.append(f"<div class='decile'>activation {low:.3g} to {high:.3g}</div>")
        out.append(_contexts(windows, card.max_activation, cfg))
    return "".join(out)


def _scores(card: FeatureCard, judge_model: str | None) -> str:
    judge = _e(judge_model or "unknown")
    rows = []
    rubric = card.scores.get("fast-paper")
    if rubric:
        expected = rubric.get("expected_score")
        extra = "" if expected is None else f" (expected {expected:.2f})"
        rows.append(("fast-paper rubric (1-5)", f"{_num(rubric.get('score'))}{extra}"))
    for scorer in ("detection", "fuzzing"):
        found = card.scores.get(scorer)
        if found:
            auroc = found.get("auroc")
            extra = "" if auroc is None else f", AUROC {auroc:.3f}"
            rows.append((f"{scorer} balanced accuracy", f"{_num(found.get('balanced_accuracy'))}{extra}"
                         f" on {found.get('n_items', '?')} items"))  # fmt: skip
    if not rows:
        return "<p class='muted'>Not in the run's scored sample.</p>"
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv' id='scores'>{body}<tr><td>judge model</td><td>{judge}</td></tr></table>"


def _stats(card: FeatureCard) -> str:
    rows = [
        ("density", f"{card.density:.4g}"),
        ("firing tokens", f"{card.count:,}"),
        ("max activation", f"{card.max_activation:.4g}"),
    ]
    return (
        "<table class='kv'>" + "".join(f"<tr><td>{k}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"
    )


def _logit_lens(card: FeatureCard) -> str:
    if not card.promoted and not card.suppressed:
        return "<p class='muted'>Computed by <code>interp run</code> for its scored features only.</p>"

    def column(title: str, tokens: list[tuple[str, float]]) -> str:
        rows = "".join(
            f"<tr><td><span class='tokchip'>{_e(t)}</span></td><td>{v:+.3f}</td></tr>" for t, v in tokens
        )
        return f"<div><div class='muted'>{title}</div><table class='kv'>{rows}</table></div>"

    return (
        "<div class='columns' id='logit-lens'>"
        + column("promoted", card.promoted)
        + column("suppressed", card.suppressed)
        + "</div>"
    )


def _neighbours(card: FeatureCard, has_card: set[int]) -> str:
    rows = []
    for f, cos in card.neighbours:
        name = f"<a href='{f}.html'>feature {f}</a>" if f in has_card else f"feature {f} (no card)"
        rows.append(f"<tr><td>{name}</td><td>cosine {cos:.3f}</td></tr>")
    return f"<table class='kv' id='neighbours'>{''.join(rows)}</table>"


def _special(card: FeatureCard) -> str:
    s = card.special
    peaks = ", ".join(
        f"<span class='tokchip{' t s' if special else ''}'>{_e(t)}</span> &times;{n}"
        for t, n, special in s.peak_tokens[:8]
    )
    rows = [
        ("firing tokens that are special", f"{s.firing_share:.1%} (all tokens: {s.base_share:.1%})"),
        ("top contexts peaking on a special token", f"{s.top_peak_share:.0%}"),
    ]
    table = "".join(f"<tr><td>{k}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table class='kv' id='special'>{table}<tr><td>peak tokens</td><td>{peaks}</td></tr></table>"


def _steer(card: FeatureCard, server_name: str) -> str:
    if card.spec is None:
        return "<p class='muted'>The SAE's cfg.json names no layer, so no spec can be written.</p>"
    spec_file = json.dumps({"interventions": [card.spec]}, indent=2, ensure_ascii=False)
    steering = json.dumps({"steering": {**card.spec, "sae": server_name}}, indent=2, ensure_ascii=False)
    folder = card.spec["sae"]
    return (
        "<p>Save as <code>spec.json</code> and run <code>fast-steer chat --spec spec.json</code> (strength: the "
        "norm this feature writes at its strongest activation; scale it to taste):</p>"
        f"<pre class='snippet' id='spec'>{_e(spec_file)}</pre>"
        f"<p>Or the <code>steering</code> field of a request to <code>fast-steer serve --sae "
        f"{_e(server_name)}={_e(folder)}</code>:</p>"
        f"<pre class='snippet' id='steering'>{_e(steering)}</pre>"
    )


def _num(value: float | None) -> str:
    return "missing" if value is None else f"{value:.3g}"


def _e(text: str) -> str:
    return escape(text, quote=True)

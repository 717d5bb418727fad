"""The token view: a conversation's tokens coloured by one feature's activation, special tokens marked."""

from __future__ import annotations

import html
from dataclasses import dataclass

from apps.colours import ACTIVATION_RGB, SPECIAL_OUTLINE


@dataclass(frozen=True)
class TokenActivation:
    """One token of the rendered conversation."""

    text: str
    activation: float
    special: bool


def render_token_html(
    tokens: list[TokenActivation], feature: int, title: str = "", legend: bool = True
) -> str:
    """HTML with one span per token: background opacity = activation / max activation.

    The first token is left out of the scale (its residual norm is often ~100x the rest), special
    and role tokens get a dashed outline, and each span's tooltip gives the exact value.
    """
    if not tokens:
        return "<div class='fs-tokens'><em>No conversation yet: send a message first.</em></div>"
    scale_from = tokens[1:] or tokens
    top = max((t.activation for t in scale_from), default=0.0)
    spans = []
    for tok in tokens:
        alpha = 0.0 if top <= 0 else min(max(tok.activation, 0.0) / top, 1.0)
        text = html.escape(tok.text).replace("\n", "↵<br>")
        classes = "fs-tok fs-special" if tok.special else "fs-tok"
        spans.append(
            f"<span class='{classes}' title='{tok.activation:.3f}' data-act='{tok.activation:.4f}' "
            f"style='background: rgba({ACTIVATION_RGB}, {alpha:.3f})'>{text}</span>"
        )
    active = sum(t.activation > 0 for t in tokens)
    head = html.escape(title) if title else f"feature {feature}"
    if legend:
        head += (
            f": active on {active} of {len(tokens)} tokens, max {top:.3f} "
            "(first token excluded from the colour scale); dashed = special/role token"
        )
    return (
        "<div class='fs-tokens'>"
        f"<div class='fs-tokens-head'>{head}</div>"
        "<div class='fs-tokens-body' style='font-family: monospace; line-height: 1.9; white-space: pre-wrap'>"
        + "".join(spans)
        + "</div></div>"
    )


TOKEN_VIEW_CSS = f"""
.fs-tok {{ border-radius: 3px; padding: 0 1px; }}
.fs-special {{ outline: {SPECIAL_OUTLINE}; font-weight: 600; }}
.fs-tokens-head {{ font-size: 0.85em; opacity: 0.8; margin-bottom: 4px; }}
"""

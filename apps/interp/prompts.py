"""What the judge is shown and how its answers are read: one place for every prompt text and its parser.

Windows are shown as `token<TAB>activation` lines (the rubric), as plain text (detection) or with `<<marked>>`
tokens (the explainer and fuzzing). Tokens appear as the tokenizer decodes them, special tokens literal;
newlines, tabs and carriage returns inside a token are escaped so that one line is one token. Answers are
`[[...]]` fields; an answer without one is missing (None), never a low score.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from apps.interp.judge import JudgeReply
from train.interp.examples import Window

SCALE = 10  # activations are shown as integers 0..SCALE
ACTIVATION_SCALE = "floor(10 * a / m), m = the largest activation among the windows shown together"
ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}

_SCORE = re.compile(r"\[\[\s*([1-5])\s*\]\]")
_BINARY = re.compile(r"\[\[\s*([01])\s*\]\]")
_FIELD = re.compile(r"\[\[(.+?)\]\]", re.DOTALL)

RUBRIC_SYSTEM = """You study the features of a language model. A feature is active on some tokens of a text; \
each token is listed on its own line with the feature's activation on it, an integer from 0 (inactive) to 10 \
(its strongest activation in these examples). The higher the number, the more that token expresses the feature.

You will see several short texts in which the feature is active. Judge how consistently the feature stands for \
one thing ("activation consistency"), on this scale:
5: a clear pattern, and every example fits it.
4: a clear pattern, with one or two examples that deviate from it.
3: a clear pattern overall, but quite a few examples do not fit it.
2: a broad, consistent theme, but without a clear structure.
1: no discernible pattern.

Also give the feature a short descriptive name (a few words)."""

RUBRIC_ANSWER = {
    False: "Answer with the score first, then the name, and nothing else, exactly in this form:\n"
    "Score: [[3]] Name: [[Questions about cooking]]",
    True: "First explain your reasoning in a few sentences. Then end with the score and the name, exactly in "
    "this form:\nScore: [[3]] Name: [[Questions about cooking]]",
}

EXPLAIN_SYSTEM = """You study the features of a language model. A feature is active on some tokens of a text. \
You will see texts in which the feature is active; the tokens where it is active are marked <<like this>>, and \
after each text the marked tokens are listed with the activation (an integer from 1 to 10, 10 = strongest).

Describe in one short sentence what the feature responds to, specific enough that someone could tell from \
your description alone whether a new text activates it. Answer with the description only, exactly in this \
form:\n[[the description]]"""

DETECTION_SYSTEM = """You study the features of a language model. You are given the description of a feature \
and one text. Decide whether the feature is active anywhere in this text.

Answer [[1]] if it is active, [[0]] if it is not, and nothing else."""

FUZZING_SYSTEM = """You study the features of a language model. You are given the description of a feature \
and one text in which some tokens are marked <<like this>>. Decide whether the marked tokens are exactly where \
this feature would be active (correctly marked) or not.

Answer [[1]] if they are correctly marked, [[0]] if they are not, and nothing else."""


def escape(token: str) -> str:
    """`token` on one line: newline, tab and carriage return written as `\\n`, `\\t`, `\\r`."""
    for raw, shown in ESCAPES.items():
        token = token.replace(raw, shown)
    return token


def crop(window: Window, radius: int) -> Window:
    """The part of `window` within `radius` tokens of its peak (the peak included)."""
    lo, hi = max(0, window.peak - radius), min(len(window.tokens), window.peak + radius + 1)
    return replace(
        window,
        start=window.start + lo,
        token_ids=window.token_ids[lo:hi],
        tokens=window.tokens[lo:hi],
        activations=window.activations[lo:hi],
        special=window.special[lo:hi],
        peak=window.peak - lo,
    )


def scaled(activation: float, top: float) -> int:
    """`activation` as an integer 0..SCALE relative to `top` (see ACTIVATION_SCALE)."""
    if top <= 0 or activation <= 0:
        return 0
    return min(SCALE, math.floor(SCALE * activation / top))


def activation_lines(window: Window, top: float) -> str:
    """One `token<TAB>activation` line per token."""
    return "\n".join(
        f"{escape(t)}\t{scaled(a, top)}" for t, a in zip(window.tokens, window.activations, strict=True)
    )


def plain_text(window: Window) -> str:
    return "".join(window.tokens)


def marked_text(window: Window, marks: set[int]) -> str:
    """The window's text with the tokens at `marks` wrapped in `<<...>>` (neighbours share one span)."""
    out: list[str] = []
    for i, token in enumerate(window.tokens):
        opens = i in marks and i - 1 not in marks
        closes = i in marks and i + 1 not in marks
        out.append(("<<" if opens else "") + token + (">>" if closes else ""))
    return "".join(out)


def rubric_messages(windows: list[Window], reason_first: bool) -> tuple[tuple[str, str], ...]:
    """The rubric conversation for one feature's windows (already cropped)."""
    top = max((w.max_activation for w in windows), default=0.0)
    blocks = [f"Example {i + 1}:\n{activation_lines(w, top)}" for i, w in enumerate(windows)]
    user = (
        "Here are the examples of one feature, one token and its activation per line:\n\n"
        + "\n\n".join(blocks)
        + "\n\n"
        + RUBRIC_ANSWER[reason_first]
    )
    return (("system", RUBRIC_SYSTEM), ("user", user))


def explain_messages(windows: list[Window]) -> tuple[tuple[str, str], ...]:
    """The explainer conversation for one feature's training windows (already cropped)."""
    top = max((w.max_activation for w in windows), default=0.0)
    blocks = []
    for i, w in enumerate(windows):
        active = [j for j, a in enumerate(w.activations) if a > 0]
        listed = ", ".join(
            f"{escape(w.tokens[j])!r}: {max(1, scaled(w.activations[j], top))}" for j in active
        )
        blocks.append(f"Example {i + 1}: {marked_text(w, set(active))}\nActivations: {listed}")
    return (("system", EXPLAIN_SYSTEM), ("user", "\n\n".join(blocks)))


def classify_messages(explanation: str, text: str, fuzzing: bool) -> tuple[tuple[str, str], ...]:
    """A detection (plain text) or fuzzing (marked text) question about one window."""
    system = FUZZING_SYSTEM if fuzzing else DETECTION_SYSTEM
    return (("system", system), ("user", f"Feature description: {explanation}\n\nText:\n{text}"))


def _score_match(text: str | None, reason_first: bool) -> re.Match[str] | None:
    """The `[[score]]` an answer gives: the first one, or the last when reasoning comes first."""
    scores = list(_SCORE.finditer(text or ""))
    return (scores[-1] if reason_first else scores[0]) if scores else None


def parse_rubric(text: str | None, reason_first: bool = False) -> tuple[int | None, str | None]:
    """`(score, name)` from `[[score]]` and the next `[[name]]`."""
    match = _score_match(text, reason_first)
    if match is None:
        return None, None
    name = _FIELD.search(match.string, match.end())
    return int(match.group(1)), (name.group(1).strip() or None) if name else None


def parse_binary(text: str | None) -> int | None:
    """1 or 0 from `[[1]]` / `[[0]]` (or a bare `1` / `0` answer)."""
    if text is None:
        return None
    match = _BINARY.search(text)
    if match:
        return int(match.group(1))
    return int(text.strip()) if text.strip() in ("0", "1") else None


def parse_explanation(text: str | None) -> str | None:
    if text is None:
        return None
    match = _FIELD.search(text)
    return (match.group(1).strip() or None) if match else None


def digit_probabilities(reply: JudgeReply, position: int, digits: str) -> dict[int, float] | None:
    """The judge's distribution over `digits` at character `position` of its reply, from the log-probs of
    the token that wrote that character (None without log-probs or without a digit among its alternatives)."""
    if reply.logprobs is None or reply.text is None:
        return None
    offset = 0
    for entry in reply.logprobs:
        end = offset + len(entry.token)
        if offset <= position < end:
            prefix = reply.text[offset:position]
            alternatives = entry.top or ((entry.token, entry.logprob),)
            probs: dict[int, float] = {}
            for token, logprob in alternatives:
                rest = token[len(prefix) :].strip() if token.startswith(prefix) else ""
                if rest[:1] and rest[:1] in digits and rest[1:].strip() in ("", "]", "]]"):
                    probs[int(rest[0])] = probs.get(int(rest[0]), 0.0) + math.exp(logprob)
            total = sum(probs.values())
            return {d: p / total for d, p in probs.items()} if total > 0 else None
        offset = end
    return None


def rubric_position(text: str | None, reason_first: bool = False) -> int | None:
    """Character index of the digit `parse_rubric` reads (None when there is none)."""
    match = _score_match(text, reason_first)
    return match.start(1) if match else None


def binary_position(text: str | None) -> int | None:
    """Character index of the digit `parse_binary` reads (None when there is none)."""
    if text is None:
        return None
    match = _BINARY.search(text)
    if match:
        return match.start(1)
    return text.index(text.strip()) if text.strip() in ("0", "1") else None

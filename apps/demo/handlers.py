"""What the page's events do, over one `DemoBackend`. Bad input is shown as a gr.Error message."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import gradio as gr

from apps.demo.backend import DemoBackend
from apps.demo.conversation import steering_note, to_conversation
from apps.demo.edits import EditRow, parse_rows
from apps.demo.panels import strength_label
from apps.demo.settings import DemoInputError, GenerationSettings
from steer.errors import FastSteerError


def user_errors(fn: Callable) -> Callable:
    """Show bad input (any `FastSteerError`: DemoInputError, SpecError, ...) as a gr.Error message instead of a
    traceback; anything else is a bug and keeps its traceback."""

    def convert(exc: Exception) -> gr.Error:
        return gr.Error(str(exc), print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except FastSteerError as exc:
                raise convert(exc) from exc

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FastSteerError as exc:
            raise convert(exc) from exc

    return wrapper


def _settings(temperature, top_p, max_new_tokens, seed) -> GenerationSettings:
    try:
        return GenerationSettings(float(temperature), float(top_p), int(max_new_tokens), int(seed))
    except (TypeError, ValueError):
        raise DemoInputError(
            f"sampling settings must be numbers, got temperature={temperature!r}, top_p={top_p!r}, "
            f"max_new_tokens={max_new_tokens!r}, seed={seed!r}"
        ) from None


def pick_feature(table, evt: gr.SelectData) -> int:
    """The feature id in the clicked row of the top-features table."""
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    rows = table.values.tolist() if hasattr(table, "values") else table
    return int(rows[row][1])


class Handlers:
    """The event handlers of one page; their parameters are the components wired to them, in order."""

    def __init__(self, backend: DemoBackend) -> None:
        self.backend = backend

    @user_errors
    def send(
        self,
        message,
        plain_history,
        steered_history,
        baseline_history,
        sae,
        edits,
        temperature,
        top_p,
        max_new_tokens,
        seed,
        show_baseline,
        system_prompt,
    ):
        backend = self.backend
        settings = _settings(temperature, top_p, max_new_tokens, seed).validate(backend.limits)
        message = backend.check_message(message)
        rows = backend.check_rows(sae, parse_rows(edits))
        panes = [(plain_history, {}), (steered_history, {"sae_name": sae, "rows": rows})]
        if show_baseline:
            panes.append((baseline_history, {"system_prompt": system_prompt or ""}))
        histories = [to_conversation(h) for h, _ in panes]
        turn = [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        shown = [[*(h or []), *turn] for h, _ in panes]

        def state():
            return ("", *shown, *([] if show_baseline else [baseline_history or []]))

        yield state()
        for i, (_, kw) in enumerate(panes):
            for reply in backend.stream(histories[i], message, settings, **kw):
                shown[i][-1] = {"role": "assistant", "content": reply.text}
                if reply.steered_positions is not None:  # the last value of a steered reply
                    shown[i].append(steering_note(reply.steered_positions))
                yield state()

    @user_errors
    def lookup(self, sae, feature, steered_history):
        convo = to_conversation(steered_history)
        return self.backend.contexts_html(sae, feature), self.backend.token_view_html(sae, feature, convo)

    @user_errors
    def select_sae(self, sae):
        backend = self.backend
        s = backend.sae(sae)
        limit = backend.max_strength(s)
        first_feature = s.top_features[0].feature if s.top_features else 0
        return (
            backend.describe_sae(sae),
            backend.feature_rows(sae),
            gr.update(minimum=-limit, maximum=limit, value=0.0, label=strength_label(backend, sae)),
            first_feature,
            [],
        )

    @user_errors
    def add_edit(self, edits, sae, feature, op, strength, positions):
        backend = self.backend
        new = EditRow(backend.check_feature(sae, feature), str(op), float(strength), str(positions))
        rows = [r for r in parse_rows(edits) if (r.feature, r.positions) != (new.feature, new.positions)]
        return backend.edit_rows(sae, backend.check_rows(sae, [*rows, new]))

    @user_errors
    def export(self, sae, edits):
        return self.backend.export(sae, parse_rows(edits))

    @user_errors
    def import_(self, spec):
        name, rows = self.backend.import_(spec)
        return name, self.backend.edit_rows(name, rows)

    @user_errors
    def search(self, sae, query):
        return self.backend.search(sae, query)

    @user_errors
    def generate(
        self,
        messages: list[dict],
        message: str,
        spec: str = "",
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 16,
        seed: int = 0,
        system_prompt: str = "",
    ) -> dict:
        """Plain, steered (by the spec JSON; its SAE must be loaded here; with `steered_positions`, the
        positions it edited) and, with a system prompt, prompt-only replies to `message` after `messages`,
        all with the same settings."""
        backend = self.backend
        settings = _settings(temperature, top_p, max_new_tokens, seed)
        history = to_conversation(messages)
        out = {"plain": backend.reply(history, message, settings).text}
        if spec.strip():
            name, rows = backend.import_(spec)
            steered = backend.reply(history, message, settings, sae_name=name, rows=rows)
            out["steered"], out["steered_positions"] = steered.text, steered.steered_positions
        if system_prompt.strip():
            out["baseline"] = backend.reply(history, message, settings, system_prompt=system_prompt).text
        return out

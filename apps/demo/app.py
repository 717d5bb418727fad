"""The Gradio Blocks page: plain / steered / prompt-only chat panes, the feature panel, the token view
and spec export/import. Every event has an `api_name`, so `gradio_client` can drive the page too."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import gradio as gr

from apps.demo.backend import DemoBackend
from apps.demo.conversation import to_conversation
from apps.demo.edits import EDIT_HEADERS, EditRow, parse_rows
from apps.demo.settings import OPS, POSITIONS, DemoInputError, GenerationSettings
from apps.demo.token_view import TOKEN_VIEW_CSS

PAGE_CSS = (
    TOKEN_VIEW_CSS
    + """
#fs-title { margin-bottom: 0; }
.fs-contexts .fs-tokens { border-bottom: 1px solid #8884; padding: 4px 0; }
"""
)
MODEL_EVENTS = "model"  # one concurrency group for everything that runs the model


def user_errors(fn: Callable) -> Callable:
    """Show bad input (DemoInputError / ValueError) as a gr.Error message instead of a traceback."""

    def convert(exc: Exception) -> gr.Error:
        return gr.Error(str(exc), print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (DemoInputError, ValueError) as exc:
                raise convert(exc) from exc

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DemoInputError, ValueError) as exc:
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


def build_app(backend: DemoBackend) -> gr.Blocks:
    """The page for `backend` (not yet launched; see `launch_app`)."""
    first = backend.default_sae
    preselect = backend.preselect
    start_feature = (
        preselect[0].feature if preselect else (first.top_features[0].feature if first.top_features else 0)
    )
    max_strength = backend.max_strength(first)
    start = preselect[0] if preselect else EditRow(start_feature, "add", 0.0, "special")

    def strength_label(name: str | None) -> str:
        s = backend.sae(name)
        return f"strength (typical residual norm at layer {s.layer}: {s.residual_norm:.1f})"

    with gr.Blocks(title="fast-steer demo", analytics_enabled=False) as app:
        gr.Markdown(
            "## fast-steer: steer a chat model through SAE features\n"
            "The plain and the steered model answer the same conversation with the same sampling settings "
            "and seed; the steered one has the intervention on the right applied.",
            elem_id="fs-title",
        )
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    plain = gr.Chatbot(label="Plain model", elem_id="plain-chat", height=380)
                    steered = gr.Chatbot(label="Steered model", elem_id="steered-chat", height=380)
                    baseline = gr.Chatbot(
                        label="Plain model + system prompt",
                        elem_id="baseline-chat",
                        height=380,
                        visible=False,
                    )
                with gr.Row():
                    message = gr.Textbox(
                        placeholder="Message both models…",
                        show_label=False,
                        scale=5,
                        elem_id="message",
                        max_length=backend.limits.max_message_chars,
                    )
                    send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    clear_btn = gr.Button("Clear chat", scale=1, elem_id="clear-chat")
                with gr.Accordion("Sampling (shared by every pane)", open=True):
                    with gr.Row():
                        temperature = gr.Slider(
                            0.0, 2.0, value=0.7, step=0.05, label="temperature (0 = greedy)"
                        )
                        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
                        max_new = gr.Slider(
                            1,
                            backend.limits.max_new_tokens,
                            value=min(96, backend.limits.max_new_tokens),
                            step=1,
                            label="max new tokens",
                        )
                        seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
                    with gr.Row():
                        show_baseline = gr.Checkbox(
                            label="Show prompt-only baseline pane", value=False, elem_id="show-baseline"
                        )
                        system_prompt = gr.Textbox(
                            label="System prompt for the baseline pane",
                            placeholder="e.g. Talk like a pirate.",
                            scale=3,
                            elem_id="system-prompt",
                        )
                token_view = gr.HTML(label="Token view", elem_id="token-view")
            with gr.Column(scale=2):
                sae_name = gr.Dropdown(
                    choices=list(backend.saes), value=first.name, label="SAE", elem_id="sae-select"
                )
                sae_info = gr.Markdown(backend.describe_sae(first.name), elem_id="sae-info")
                features = gr.Dataframe(
                    value=backend.feature_rows(first.name),
                    headers=["token", "feature", "mean max act"],
                    datatype=["str", "number", "number"],
                    label="Top features per special token (click a row to choose it)",
                    interactive=False,
                    max_height=220,
                    elem_id="feature-table",
                )
                with gr.Row():
                    feature = gr.Number(
                        value=start_feature, precision=0, label="feature id", elem_id="feature-id"
                    )
                    lookup_btn = gr.Button("Look up", elem_id="lookup")
                op = gr.Radio(list(OPS), value=start.op, label="op", elem_id="op")
                strength = gr.Slider(
                    -max_strength,
                    max_strength,
                    value=start.strength,
                    step=0.1,
                    label=strength_label(first.name),
                    elem_id="strength",
                )
                positions = gr.Radio(
                    list(POSITIONS), value=start.positions, label="positions", elem_id="positions"
                )
                with gr.Row():
                    add_btn = gr.Button("Add / update edit", variant="secondary", elem_id="add-edit")
                    clear_edits_btn = gr.Button("Remove all edits", elem_id="clear-edits")
                edits = gr.Dataframe(
                    value=[r.as_list() for r in preselect],
                    headers=EDIT_HEADERS,
                    datatype=["number", "str", "number", "str"],
                    type="array",
                    label="Intervention (edits applied to the steered pane)",
                    interactive=True,
                    elem_id="edits",
                )
                with gr.Accordion(
                    "Spec JSON (for `fast-steer chat --spec` and `fast-steer lm-eval`)", open=False
                ):
                    spec_text = gr.Code(language="json", label="spec", elem_id="spec-json", interactive=True)
                    with gr.Row():
                        export_btn = gr.Button("Export", elem_id="export-spec")
                        import_btn = gr.Button("Import", elem_id="import-spec")
                contexts = gr.HTML(elem_id="contexts")

        # -- handlers ------------------------------------------------------------------------
        @user_errors
        def send(
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
                for text in backend.stream(histories[i], message, settings, **kw):
                    shown[i][-1] = {"role": "assistant", "content": text}
                    yield state()

        @user_errors
        def lookup(sae, feature, steered_history):
            convo = to_conversation(steered_history)
            return backend.contexts_html(sae, feature), backend.token_view_html(sae, feature, convo)

        @user_errors
        def select_sae(sae):
            name = sae
            s = backend.sae(name)
            limit = backend.max_strength(s)
            first_feature = s.top_features[0].feature if s.top_features else 0
            return (
                backend.describe_sae(name),
                backend.feature_rows(name),
                gr.update(minimum=-limit, maximum=limit, value=0.0, label=strength_label(name)),
                first_feature,
                [],
            )

        def pick_feature(table, evt: gr.SelectData):
            row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            rows = table.values.tolist() if hasattr(table, "values") else table
            return int(rows[row][1])

        @user_errors
        def add_edit(edits, sae, feature, op, strength, positions):
            new = EditRow(backend.check_feature(sae, feature), str(op), float(strength), str(positions))
            rows = [r for r in parse_rows(edits) if (r.feature, r.positions) != (new.feature, new.positions)]
            return [r.as_list() for r in backend.check_rows(sae, [*rows, new])]

        @user_errors
        def export(sae, edits):
            return backend.export(sae, parse_rows(edits))

        @user_errors
        def import_(spec):
            name, rows = backend.import_(spec)
            return name, [r.as_list() for r in rows]

        @user_errors
        def generate(
            messages: list[dict],
            message: str,
            spec: str = "",
            temperature: float = 0.0,
            top_p: float = 1.0,
            max_new_tokens: int = 16,
            seed: int = 0,
            system_prompt: str = "",
        ) -> dict:
            """Plain, steered (by the spec JSON; its SAE must be loaded here) and, with a system
            prompt, prompt-only replies to `message` after `messages`, all with the same settings."""
            settings = _settings(temperature, top_p, max_new_tokens, seed)
            history = to_conversation(messages)
            out = {"plain": backend.reply(history, message, settings)}
            if spec.strip():
                name, rows = backend.import_(spec)
                out["steered"] = backend.reply(history, message, settings, sae_name=name, rows=rows)
            if system_prompt.strip():
                out["baseline"] = backend.reply(history, message, settings, system_prompt=system_prompt)
            return out

        # -- wiring --------------------------------------------------------------------------
        send_inputs = [
            message,
            plain,
            steered,
            baseline,
            sae_name,
            edits,
            temperature,
            top_p,
            max_new,
            seed,
            show_baseline,
            system_prompt,
        ]
        send_outputs = [message, plain, steered, baseline]
        for trigger, api_name in ((send_btn.click, "send"), (message.submit, False)):
            trigger(
                send,
                send_inputs,
                send_outputs,
                api_name=api_name,
                concurrency_id=MODEL_EVENTS,
            ).success(
                lookup,
                [sae_name, feature, steered],
                [contexts, token_view],
                api_name=False,
                concurrency_id=MODEL_EVENTS,
            )
        clear_btn.click(lambda: ([], [], []), None, [plain, steered, baseline], api_name=False, queue=False)
        show_baseline.change(
            lambda v: gr.update(visible=v), show_baseline, baseline, api_name=False, queue=False
        )
        lookup_btn.click(
            lookup,
            [sae_name, feature, steered],
            [contexts, token_view],
            api_name="lookup_feature",
            concurrency_id=MODEL_EVENTS,
        )
        features.select(pick_feature, features, feature, api_name=False).then(
            lookup,
            [sae_name, feature, steered],
            [contexts, token_view],
            api_name=False,
            concurrency_id=MODEL_EVENTS,
        )
        sae_name.input(
            select_sae, sae_name, [sae_info, features, strength, feature, edits], api_name="select_sae"
        )
        add_btn.click(
            add_edit, [edits, sae_name, feature, op, strength, positions], edits, api_name="add_edit"
        )
        clear_edits_btn.click(lambda: [], None, edits, api_name=False, queue=False)
        export_btn.click(export, [sae_name, edits], spec_text, api_name="export_spec")
        import_btn.click(import_, spec_text, [sae_name, edits], api_name="import_spec")
        gr.api(generate, api_name="generate", concurrency_id=MODEL_EVENTS)
        app.load(
            lookup,
            [sae_name, feature, steered],
            [contexts, token_view],
            api_name=False,
            concurrency_id=MODEL_EVENTS,
        )
    return app


def launch_app(app: gr.Blocks, backend: DemoBackend, host: str = "127.0.0.1", port: int | None = None, **kw):
    """Queue (one model event at a time, bounded queue) and serve on `host:port`; no sharing, no files."""
    app.queue(default_concurrency_limit=backend.limits.concurrency, max_size=backend.limits.max_queue)
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        css=PAGE_CSS,
        max_file_size="1mb",
        footer_links=["api"],
        show_error=True,
        **kw,
    )

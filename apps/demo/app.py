"""The Gradio Blocks page: plain / steered / prompt-only chat panes, the feature panel, the token view
and spec export/import. The panels are built in `apps.demo.panels`, the handlers live in
`apps.demo.handlers`; this module lays them out and wires the events. Every event has an `api_name`, so
`gradio_client` can drive the page too."""

from __future__ import annotations

import gradio as gr

from apps.demo import panels
from apps.demo.access import Auth, check_bind
from apps.demo.backend import DemoBackend
from apps.demo.handlers import Handlers, pick_feature
from apps.demo.token_view import TOKEN_VIEW_CSS

PAGE_CSS = (
    TOKEN_VIEW_CSS
    + """
#fs-title { margin-bottom: 0; }
.fs-contexts .fs-tokens { border-bottom: 1px solid #8884; padding: 4px 0; }
"""
)
MODEL_EVENTS = "model"  # one concurrency group for everything that runs the model


def build_app(backend: DemoBackend) -> gr.Blocks:
    """The page for `backend` (not yet launched; see `launch_app`)."""
    handlers = Handlers(backend)
    start = panels.start_edit(backend)
    with gr.Blocks(title="fast-steer demo", analytics_enabled=False) as app:
        gr.Markdown(panels.TITLE, elem_id="fs-title")
        with gr.Row():
            with gr.Column(scale=3):
                chat = panels.chat_panes(backend.limits)
                sampling = panels.sampling_panel(backend.limits)
                token_view = gr.HTML(label="Token view", elem_id="token-view")
            with gr.Column(scale=2):
                feature = panels.feature_panel(backend, start.feature)
                edit = panels.edit_panel(backend, start)
                spec = panels.spec_panel()
                contexts = gr.HTML(elem_id="contexts")

        # the feature's top contexts and its token view on the steered conversation, after what changed them
        lookup = dict(
            fn=handlers.lookup,
            inputs=[feature.sae_name, feature.feature, chat.steered],
            outputs=[contexts, token_view],
            concurrency_id=MODEL_EVENTS,
        )
        histories = [chat.plain, chat.steered, chat.baseline]
        send_inputs = [chat.message, *histories, feature.sae_name, edit.edits, *sampling.inputs]
        for trigger, api_name in ((chat.send_btn.click, "send"), (chat.message.submit, False)):
            trigger(
                handlers.send,
                send_inputs,
                [chat.message, *histories],
                api_name=api_name,
                concurrency_id=MODEL_EVENTS,
            ).success(**lookup, api_name=False)
        chat.clear_btn.click(lambda: ([], [], []), None, histories, api_name=False, queue=False)
        sampling.show_baseline.change(
            lambda v: gr.update(visible=v), sampling.show_baseline, chat.baseline, api_name=False, queue=False
        )
        feature.lookup_btn.click(**lookup, api_name="lookup_feature")
        feature.features.select(pick_feature, feature.features, feature.feature, api_name=False).then(
            **lookup, api_name=False
        )
        if feature.search is not None:
            search = feature.search
            for trigger, api_name in (
                (search.search_btn.click, "search_features"),
                (search.query.submit, False),
            ):
                trigger(handlers.search, [feature.sae_name, search.query], search.results, api_name=api_name)
            search.results.select(pick_feature, search.results, feature.feature, api_name=False).then(
                **lookup, api_name=False
            )
        feature.sae_name.input(
            handlers.select_sae,
            feature.sae_name,
            [feature.sae_info, feature.features, edit.strength, feature.feature, edit.edits],
            api_name="select_sae",
        )
        edit.add_btn.click(
            handlers.add_edit,
            [edit.edits, feature.sae_name, feature.feature, edit.op, edit.strength, edit.positions],
            edit.edits,
            api_name="add_edit",
        )
        edit.clear_btn.click(lambda: [], None, edit.edits, api_name=False, queue=False)
        spec.export_btn.click(
            handlers.export, [feature.sae_name, edit.edits], spec.spec_text, api_name="export_spec"
        )
        spec.import_btn.click(
            handlers.import_, spec.spec_text, [feature.sae_name, edit.edits], api_name="import_spec"
        )
        gr.api(handlers.generate, api_name="generate", concurrency_id=MODEL_EVENTS)
        app.load(**lookup, api_name=False)
    return app


def launch_app(
    app: gr.Blocks,
    backend: DemoBackend,
    host: str = "127.0.0.1",
    port: int | None = None,
    auth: Auth | None = None,
    **kw,
):
    """Queue (one model event at a time, bounded queue) and serve on `host:port`; no sharing, no files.
    `auth`: the (user, password) to log in with, required off loopback (`access.check_bind`)."""
    check_bind(host, auth)
    app.queue(default_concurrency_limit=backend.limits.concurrency, max_size=backend.limits.max_queue)
    return app.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        css=PAGE_CSS,
        max_file_size="1mb",
        footer_links=["api"],
        show_error=True,
        **kw,
    )

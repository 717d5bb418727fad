"""The parts of the demo page. Each function builds one panel inside the layout block it is called in and
returns the components that the event wiring (`apps.demo.app`) needs."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from apps.demo.backend import DemoBackend
from apps.demo.edits import EDIT_HEADERS, EditRow
from apps.demo.settings import DemoLimits
from apps.evaluation.primitives import SCALE_STATISTIC
from steer.spec import OPS, POSITION_MODES

TITLE = (
    "## fast-steer: steer a chat model through SAE features\n"
    "The plain and the steered model answer the same conversation with the same sampling settings "
    "and seed; the steered one has the intervention on the right applied."
)


def strength_label(backend: DemoBackend, sae_name: str | None) -> str:
    """The strength slider's label: the scale it is on, for the chosen SAE."""
    s = backend.sae(sae_name)
    return f"strength (add: % of R = {s.residual_norm:.2f}, the {SCALE_STATISTIC} of layer {s.layer})"


def start_edit(backend: DemoBackend) -> EditRow:
    """The edit the page opens with: the first preselected one, else `add 0` of the top feature."""
    if backend.preselect:
        return backend.preselect[0]
    top = backend.default_sae.top_features
    return EditRow(top[0].feature if top else 0, "add", 0.0, "special")


@dataclass
class ChatPanes:
    """The plain, steered and prompt-only panes, and the message box with its buttons."""

    plain: gr.Chatbot
    steered: gr.Chatbot
    baseline: gr.Chatbot
    message: gr.Textbox
    send_btn: gr.Button
    clear_btn: gr.Button


def chat_panes(limits: DemoLimits) -> ChatPanes:
    with gr.Row():
        plain = gr.Chatbot(label="Plain model", elem_id="plain-chat", height=380)
        steered = gr.Chatbot(label="Steered model", elem_id="steered-chat", height=380)
        baseline = gr.Chatbot(
            label="Plain model + system prompt", elem_id="baseline-chat", height=380, visible=False
        )
    with gr.Row():
        message = gr.Textbox(
            placeholder="Message both models…",
            show_label=False,
            scale=5,
            elem_id="message",
            max_length=limits.max_message_chars,
        )
        send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        clear_btn = gr.Button("Clear chat", scale=1, elem_id="clear-chat")
    return ChatPanes(plain, steered, baseline, message, send_btn, clear_btn)


@dataclass
class SamplingPanel:
    """The sampling settings every pane shares, and the prompt-only baseline's switch and system prompt."""

    temperature: gr.Slider
    top_p: gr.Slider
    max_new: gr.Slider
    seed: gr.Number
    show_baseline: gr.Checkbox
    system_prompt: gr.Textbox

    @property
    def inputs(self) -> list[gr.components.Component]:
        """In the order `Handlers.send` takes them."""
        return [self.temperature, self.top_p, self.max_new, self.seed, self.show_baseline, self.system_prompt]


def sampling_panel(limits: DemoLimits) -> SamplingPanel:
    with gr.Accordion("Sampling (shared by every pane)", open=True):
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
            max_new = gr.Slider(
                1,
                limits.max_new_tokens,
                value=min(96, limits.max_new_tokens),
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
    return SamplingPanel(temperature, top_p, max_new, seed, show_baseline, system_prompt)


@dataclass
class FeatureSearch:
    """The search of features by label (on a page whose SAEs have labels): query, button, results."""

    query: gr.Textbox
    search_btn: gr.Button
    results: gr.Dataframe


@dataclass
class FeaturePanel:
    """The SAE choice, its top features per special token, the feature id to look up or edit, and the
    search by label (None when no SAE has labels)."""

    sae_name: gr.Dropdown
    sae_info: gr.Markdown
    features: gr.Dataframe
    feature: gr.Number
    lookup_btn: gr.Button
    search: FeatureSearch | None


def _label_column(backend: DemoBackend) -> list[str]:
    return ["label"] if backend.labelled else []


def _link_column(backend: DemoBackend) -> list[str]:
    return ["Neuronpedia"] if backend.linked else []


def feature_panel(backend: DemoBackend, start_feature: int) -> FeaturePanel:
    first = backend.default_sae
    sae_name = gr.Dropdown(choices=list(backend.saes), value=first.name, label="SAE", elem_id="sae-select")
    sae_info = gr.Markdown(backend.describe_sae(first.name), elem_id="sae-info")
    search = feature_search(backend) if backend.labelled else None
    features = gr.Dataframe(
        value=backend.feature_rows(first.name),
        headers=["token", "feature", "mean max act", *_label_column(backend), *_link_column(backend)],
        datatype=[
            "str",
            "number",
            "number",
            *(["str"] * len(_label_column(backend))),
            *(["markdown"] * len(_link_column(backend))),
        ],
        label="Top features per special token (click a row to choose it)",
        interactive=False,
        max_height=220,
        elem_id="feature-table",
    )
    with gr.Row():
        feature = gr.Number(value=start_feature, precision=0, label="feature id", elem_id="feature-id")
        lookup_btn = gr.Button("Look up", elem_id="lookup")
    return FeaturePanel(sae_name, sae_info, features, feature, lookup_btn, search)


def feature_search(backend: DemoBackend) -> FeatureSearch:
    with gr.Row():
        query = gr.Textbox(
            placeholder='Search features by label, e.g. "polite tone"',
            show_label=False,
            scale=4,
            max_length=backend.limits.max_search_chars,
            elem_id="feature-search",
        )
        search_btn = gr.Button("Search", scale=1, elem_id="feature-search-btn")
    results = gr.Dataframe(
        value=[],
        headers=["match", "feature", "label", "score", "density"],
        datatype=["number", "number", "str", "number", "number"],
        label="Features whose labels match, best first (BM25 match score; the judge's score; firing density). "
        "Click a row to choose it.",
        interactive=False,
        max_height=220,
        elem_id="search-results",
    )
    return FeatureSearch(query, search_btn, results)


@dataclass
class EditPanel:
    """One edit's op, strength and positions, and the intervention table the steered pane applies."""

    op: gr.Radio
    strength: gr.Slider
    positions: gr.Radio
    add_btn: gr.Button
    clear_btn: gr.Button
    edits: gr.Dataframe


def edit_panel(backend: DemoBackend, start: EditRow) -> EditPanel:
    first = backend.default_sae
    max_strength = backend.max_strength(first)
    op = gr.Radio(list(OPS), value=start.op, label="op", elem_id="op")
    strength = gr.Slider(
        -max_strength,
        max_strength,
        value=start.strength,
        step=0.1,
        label=strength_label(backend, first.name),
        elem_id="strength",
    )
    positions = gr.Radio(list(POSITION_MODES), value=start.positions, label="positions", elem_id="positions")
    with gr.Row():
        add_btn = gr.Button("Add / update edit", variant="secondary", elem_id="add-edit")
        clear_btn = gr.Button("Remove all edits", elem_id="clear-edits")
    edits = gr.Dataframe(
        value=backend.edit_rows(first.name, backend.preselect),
        headers=[*EDIT_HEADERS, *_label_column(backend)],
        datatype=["number", "str", "number", "str", *(["str"] * len(_label_column(backend)))],
        type="array",
        label="Intervention (edits applied to the steered pane)",
        interactive=True,
        elem_id="edits",
    )
    return EditPanel(op, strength, positions, add_btn, clear_btn, edits)


@dataclass
class SpecPanel:
    """The spec JSON box with its export and import buttons."""

    spec_text: gr.Code
    export_btn: gr.Button
    import_btn: gr.Button


def spec_panel() -> SpecPanel:
    with gr.Accordion("Spec JSON (for `fast-steer chat --spec` and `fast-steer lm-eval`)", open=False):
        spec_text = gr.Code(language="json", label="spec", elem_id="spec-json", interactive=True)
        with gr.Row():
            export_btn = gr.Button("Export", elem_id="export-spec")
            import_btn = gr.Button("Import", elem_id="import-spec")
    return SpecPanel(spec_text, export_btn, import_btn)

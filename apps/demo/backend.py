"""Everything the page asks of the model: streamed replies (plain, steered, prompt-only baseline),
feature tables and contexts, the token view, and spec export/import, with the server's limits applied.

One lock serialises every use of the model: steering hooks are installed on the shared model while a
steered reply is generated, so nothing else may run on it at that time.
"""

from __future__ import annotations

import collections
import html
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from apps.demo.conversation import Conversation, conversation_ids, with_user_turn
from apps.demo.edits import EditRow, validate_rows
from apps.demo.residuals import ResidualSample, sample_residuals
from apps.demo.settings import DemoInputError, DemoLimits, GenerationSettings
from apps.demo.spec_io import build_interventions, export_spec, import_spec
from apps.demo.streaming import stream_reply
from apps.demo.token_view import TokenActivation, render_token_html
from hub.registry import feature_url
from steer.errors import ConfigError
from steer.positions import SINK_POSITION, pad_token_id, resolve_special_tokens
from steer.sae import SAE
from steer.spec import SAERef
from steer.steered_model import SteeredModel
from train.feature_table import TopFeature
from train.features import feature_activations
from train.harvest import Harvester
from train.sequences import make_batch


@dataclass
class DemoSAE:
    """An SAE the server was started with: the weights, and what we know about it."""

    name: str
    sae: SAE
    top_features: list[TopFeature] = field(default_factory=list)
    sample: ResidualSample | None = None

    @property
    def ref(self) -> SAERef | None:
        """Where the SAE was loaded from (the reference that exported specs name)."""
        return self.sae.source

    @property
    def labels(self):
        """The default labelling its folder carried (`hub.labels.Labelling`), or None."""
        return self.sae.labels

    @property
    def layer(self) -> int:
        """The layer the SAE was trained on (`load_demo_sae` checks that its metadata names one)."""
        return self.sae.layer

    @property
    def residual_norm(self) -> float:
        """The strength scale `R` of the SAE's layer (`ResidualSample.scale_norm`; 1.0 without a sample):
        an `add` edit of strength s adds s/100 x R, as in steer-eval and the sweep."""
        return self.sample.scale_norm if self.sample is not None else 1.0


def check_fits(sae: SAE, layer: int, model, name: str) -> None:
    """A ValueError when the SAE cannot be used with the model (width or layer mismatch)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if sae.d_in != cfg.hidden_size:
        raise ConfigError(
            f"SAE {name!r} does not fit the model: it reads d_in={sae.d_in} but the model's residual "
            f"stream has hidden_size={cfg.hidden_size}"
        )
    if not 0 <= layer < cfg.num_hidden_layers:
        raise ConfigError(
            f"SAE {name!r} does not fit the model: layer {layer} is outside the model's "
            f"{cfg.num_hidden_layers} layers (0 to {cfg.num_hidden_layers - 1})"
        )


@dataclass(frozen=True)
class Reply:
    """A reply so far; `steered_positions` (the positions the spec edited) comes with the last value of a
    steered reply, and is None otherwise."""

    text: str
    steered_positions: int | None = None


class DemoBackend:
    """The model, its SAEs and the sample conversations, behind methods the page calls."""

    def __init__(
        self,
        model,
        tokenizer,
        saes: list[DemoSAE],
        *,
        model_ref: str = "default",
        limits: DemoLimits | None = None,
        sample_conversations: list[Conversation] | None = None,
        preselect: list[EditRow] | None = None,
    ) -> None:
        if not saes:
            raise ConfigError("the demo needs at least one SAE")
        names = [s.name for s in saes]
        if len(set(names)) != len(names):
            raise ConfigError(f"SAE names must be unique, got {names}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_ref = model_ref
        self.limits = limits or DemoLimits()
        self.special = resolve_special_tokens(tokenizer)
        self.steered = SteeredModel(model, tokenizer)
        self.saes = {s.name: s for s in saes}
        # with labels on any SAE, the feature and intervention tables get a label column and the page a search
        self.labelled = any(s.labels is not None for s in saes)
        # with a Neuronpedia id on any SAE (a registered release), the feature table gets a link column
        self.linked = any(s.sae.metadata.get("neuronpedia_id") for s in saes)
        self.lock = threading.Lock()
        samples: dict[int, ResidualSample] = {}
        for s in saes:
            check_fits(s.sae, s.layer, model, s.name)
            if s.sample is None and sample_conversations:
                if s.layer not in samples:
                    samples[s.layer] = sample_residuals(
                        model, tokenizer, sample_conversations, s.layer, self.special
                    )
                s.sample = samples[s.layer]
        self.preselect = validate_rows(list(preselect or []), *self._row_limits(saes[0]))

    # -- SAEs and limits ---------------------------------------------------------------------
    @property
    def default_sae(self) -> DemoSAE:
        return next(iter(self.saes.values()))

    def sae(self, name: str | None) -> DemoSAE:
        if name is None:
            return self.default_sae
        if name not in self.saes:
            raise DemoInputError(f"unknown SAE {name!r}; this demo was started with: {', '.join(self.saes)}")
        return self.saes[name]

    def max_strength(self, sae: DemoSAE) -> float:
        """The largest |strength| of an edit on `sae` (on the study's scale, so the same for every SAE)."""
        return self.limits.max_strength()

    def _row_limits(self, sae: DemoSAE) -> tuple[int, float, int]:
        return sae.sae.d_sae, self.max_strength(sae), self.limits.max_edits

    def check_rows(self, sae_name: str | None, rows: list[EditRow]) -> list[EditRow]:
        return validate_rows(rows, *self._row_limits(self.sae(sae_name)))

    def describe_sae(self, name: str | None) -> str:
        """One line for the page: where the SAE came from, its layer, width and the residual scale."""
        s = self.sae(name)
        return (
            f"**{s.name}** ({s.sae.cfg.architecture}, {s.sae.d_sae} features) at layer {s.layer} of "
            f"`{self.model_ref}` · strength scale R at this layer: **{s.residual_norm:.2f}** "
            f"(an add of strength s adds s/100 x R; limit ±{self.max_strength(s)})"
        )

    # -- chat --------------------------------------------------------------------------------
    def prompt_ids(self, conversation: Conversation) -> torch.Tensor:
        """The conversation in the chat template with the assistant prompt, within the length limit."""
        ids = conversation_ids(self.tokenizer, conversation, add_generation_prompt=True)
        if len(ids) > self.limits.max_prompt_tokens:
            raise DemoInputError(
                f"the conversation is {len(ids)} tokens long; the limit is {self.limits.max_prompt_tokens}. "
                "Clear the chat to start again."
            )
        return torch.tensor([ids], dtype=torch.long, device=self.model.device)

    def check_message(self, message: str) -> str:
        message = (message or "").strip()
        if not message:
            raise DemoInputError("type a message first")
        if len(message) > self.limits.max_message_chars:
            raise DemoInputError(
                f"the message is {len(message)} characters long; the limit is {self.limits.max_message_chars}"
            )
        return message

    def stream(
        self,
        history: Conversation,
        message: str,
        settings: GenerationSettings,
        *,
        sae_name: str | None = None,
        rows: list[EditRow] | None = None,
        system_prompt: str = "",
    ) -> Iterator[Reply]:
        """Stream the reply to `message` after `history`: steered by `rows` on `sae_name` when given, the
        last value then carrying the positions the spec edited."""
        settings.validate(self.limits)
        ids = self.prompt_ids(with_user_turn(history, self.check_message(message), system_prompt))
        context = nullcontext
        reports = []
        if rows:
            specs = build_interventions(self.sae(sae_name), self.check_rows(sae_name, rows))

            @contextmanager
            def context():
                with self.steered.steer(*specs) as report:
                    reports.append(report)
                    yield

        with self.lock:
            text = ""
            for text in stream_reply(
                self.steered.generate, self.tokenizer, ids, settings.generate_kwargs(), settings.seed, context
            ):
                yield Reply(text.strip())
            if reports:
                yield Reply(text.strip(), reports[0].positions)

    def reply(self, history: Conversation, message: str, settings: GenerationSettings, **kw) -> Reply:
        """The whole reply (the last value of `stream`)."""
        last = collections.deque(self.stream(history, message, settings, **kw), maxlen=1)
        return last[0] if last else Reply("")

    # -- features ----------------------------------------------------------------------------
    def feature_rows(self, sae_name: str | None) -> list[list]:
        """The discovery table: [token, feature, mean max activation(, label)(, Neuronpedia link)] per row."""
        s = self.sae(sae_name)
        return [
            [
                t.token,
                t.feature,
                round(t.mean_max, 3),
                *self._label_cell(s, t.feature),
                *self._link_cell(s, t.feature),
            ]
            for t in s.top_features
        ]

    def edit_rows(self, sae_name: str | None, rows: list[EditRow]) -> list[list]:
        """The intervention table: [feature, op, strength, positions(, label)] per edit."""
        s = self.sae(sae_name)
        return [[*r.as_list(), *self._label_cell(s, r.feature)] for r in rows]

    def _label_cell(self, s: DemoSAE, feature: int) -> list[str]:
        """The label column's cell of `feature` (empty when unlabelled), or no cell on a page without labels."""
        if not self.labelled:
            return []
        return [(s.labels.get(feature) if s.labels is not None else None) or ""]

    def feature_link(self, sae_name: str | None, feature: int) -> str | None:
        """The feature's Neuronpedia page where its SAE has a Neuronpedia id (`hub.registry`), else None."""
        return feature_url(self.sae(sae_name).sae.metadata, feature)

    def _link_cell(self, s: DemoSAE, feature: int) -> list[str]:
        """The link column's Markdown cell of `feature` (empty when unknown), or no cell on a page without
        links."""
        if not self.linked:
            return []
        url = feature_url(s.sae.metadata, feature)
        return [f"[{feature}]({url})" if url else ""]

    def feature_title(self, sae_name: str | None, feature: int) -> str:
        """`feature 12 ("polite tone")`, or `feature 12` without a label."""
        s = self.sae(sae_name)
        label = s.labels.get(feature) if s.labels is not None else None
        return f"feature {feature}" if label is None else f'feature {feature} ("{label}")'

    def search(self, sae_name: str | None, query) -> list[list]:
        """[match, feature, label, judge score, density] of the SAE's features whose labels match `query`,
        best first (`hub.labels.Labelling.search`); an empty query, no match or no labels: no rows."""
        s = self.sae(sae_name)
        query = str(query or "")
        if len(query) > self.limits.max_search_chars:
            raise DemoInputError(
                f"the search is {len(query)} characters long; the limit is {self.limits.max_search_chars}"
            )
        if s.labels is None:
            return []
        return [
            [round(h.match, 3), h.feature, h.label, h.score, h.density]
            for h in s.labels.search(query, self.limits.max_search_results)
        ]

    def check_feature(self, sae_name: str | None, feature) -> int:
        s = self.sae(sae_name)
        try:
            number = float(feature)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or not number.is_integer():
            raise DemoInputError(f"feature id must be a whole number, got {feature!r}")
        k = int(number)
        if not 0 <= k < s.sae.d_sae:
            raise DemoInputError(f"unknown feature id {k}; this SAE has features 0 to {s.sae.d_sae - 1}")
        return k

    def contexts_html(self, sae_name: str | None, feature, k: int = 5, window: int = 12) -> str:
        """The `k` sample conversations where the feature fires hardest, a window around the peak."""
        s = self.sae(sae_name)
        feature = self.check_feature(sae_name, feature)
        url = self.feature_link(sae_name, feature)
        link = ""
        if url is not None:
            url = html.escape(url)
            link = f"<p><a href='{url}' target='_blank'>Neuronpedia: {url}</a></p>"
        return link + self._contexts(s, feature, k, window)

    def _contexts(self, s: DemoSAE, feature: int, k: int, window: int) -> str:
        """The top-contexts HTML of `contexts_html` (after its Neuronpedia link)."""
        if s.sample is None:
            return "<em>No sample conversations were given to this demo (start it with --data).</em>"
        with self.lock:
            peaks = []
            for i, residual in enumerate(s.sample.residuals):
                acts = feature_activations(s.sae, residual, feature)
                acts[SINK_POSITION] = 0.0  # the attention sink's residual is an outlier
                peaks.append((float(acts.max()), int(acts.argmax()), i, acts))
        peaks.sort(key=lambda p: -p[0])
        items = []
        for value, pos, i, acts in peaks[:k]:
            if value <= 0:
                break
            ids = s.sample.token_ids[i]
            lo, hi = max(0, pos - window), min(len(ids), pos + 4)
            tokens = [
                TokenActivation(self.tokenizer.decode([ids[j]]), float(acts[j]), s.sample.special[i][j])
                for j in range(lo, hi)
            ]
            title = f"conversation {i}: {value:.3f} at token {pos}"
            items.append(render_token_html(tokens, feature, title=title, legend=False))
        if not items:
            return f"<em>Feature {feature} does not fire on the {len(s.sample.residuals)} sample conversations.</em>"
        head = html.escape(f"Top contexts of {self.feature_title(s.name, feature)}")
        return f"<div class='fs-contexts'><b>{head}</b>{''.join(items)}</div>"

    def token_view_html(self, sae_name: str | None, feature, conversation: Conversation) -> str:
        """The conversation's tokens coloured by the feature's activation at the SAE's layer."""
        s = self.sae(sae_name)
        feature = self.check_feature(sae_name, feature)
        if not conversation:
            return render_token_html([], feature)
        ids = conversation_ids(self.tokenizer, conversation, add_generation_prompt=False)
        ids = ids[: self.limits.max_prompt_tokens]
        with self.lock, torch.no_grad():
            residual = Harvester(self.model, s.layer).per_sequence(
                make_batch([ids], pad_token_id(self.tokenizer))
            )[0]
            acts = feature_activations(s.sae, residual, feature)
        marks = self.special.mask(torch.tensor(ids)).tolist()
        tokens = [
            TokenActivation(self.tokenizer.decode([t]), float(a), m)
            for t, a, m in zip(ids, acts.tolist(), marks, strict=True)
        ]
        title = f"{self.feature_title(sae_name, feature)} on the steered conversation"
        return render_token_html(tokens, feature, title=title)

    # -- spec export / import ------------------------------------------------------------------
    def export(self, sae_name: str | None, rows: list[EditRow]) -> str:
        s = self.sae(sae_name)
        return export_spec(s, self.check_rows(s.name, rows))

    def import_(self, text: str) -> tuple[str, list[EditRow]]:
        """(SAE name, rows) of a spec JSON; its SAE must be one the server was started with."""
        name, rows = import_spec(text, list(self.saes.values()))
        return name, self.check_rows(name, rows)

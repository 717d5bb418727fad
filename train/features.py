"""Feature discovery on special tokens (FAST paper, App. F) and top-activating contexts of a feature.

`discover_features`: for every special token and role-name token of the chat template (the token
types of `SpecialTokens.labels`), each SAE feature's maximum activation on that token type within
a conversation, averaged over the conversations that contain it; the top features per token type.
Each conversation is rendered alone with its chat template (FAST) and the forward stops after the
SAE's layer (`train.harvest.Harvester`); only the marked positions are encoded.

`top_contexts`: the conversations where one feature is strongest, with the activating token and a
window of tokens around it (`FeatureContext.render` highlights the token with ANSI or brackets).

Position 0 is skipped by default (`skip_first=True`): its residual is an attention-sink outlier
(about 100x the norm of the rest in SmolLM2) and would dominate the `<|im_start|>` statistics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.chat_template import turn_opening_token
from steer.errors import ConfigError
from steer.positions import SINK_POSITION, SpecialTokens, pad_token_id, resolve_special_tokens, without_sink
from steer.sae import SAE
from train.data import Conversation
from train.harvest import Harvester
from train.sequences import bucket_batches, fast_sequences

ANSI_HIGHLIGHT = "\033[1;31m"
ANSI_RESET = "\033[0m"


@dataclass
class FeatureStat:
    """One feature on one token type: mean over conversations of its max activation, and how often it fires."""

    feature: int
    mean_max_activation: float
    fire_rate: float


@dataclass
class TokenTypeFeatures:
    """The top features of one token type (`<|im_start|>`, `user`, `ass`, ...)."""

    token: str
    n_conversations: int
    top: list[FeatureStat]


@dataclass
class FeatureReport:
    """Top features per special/role token type, with what was measured."""

    layer: int
    n_conversations: int
    top_k: int
    skip_first: bool
    special_tokens: dict[str, Any]
    token_types: list[TokenTypeFeatures] = field(default_factory=list)

    def top(self, token: str) -> list[FeatureStat]:
        """The top features of `token` (a token string as in `SpecialTokens.labels`)."""
        for entry in self.token_types:
            if entry.token == token:
                return entry.top
        known = ", ".join(repr(e.token) for e in self.token_types)
        raise KeyError(f"no token type {token!r} in the report; found {known}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["token_types"] = {
            e["token"]: {k: v for k, v in e.items() if k != "token"} for e in out["token_types"]
        }
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


@dataclass
class FeatureContext:
    """Where a feature fired most in one conversation: the token, its neighbours and the activation."""

    conversation: int
    position: int
    activation: float
    token: str
    before: list[str]
    after: list[str]
    label: str | None = None

    def render(self, style: str = "brackets") -> str:
        """One line of text with the activating token highlighted: `brackets` ([[tok]]) or `ansi` (bold red)."""
        if style not in ("brackets", "ansi"):
            raise ConfigError(f"style must be 'brackets' or 'ansi', got {style!r}")
        left, right = ("[[", "]]") if style == "brackets" else (ANSI_HIGHLIGHT, ANSI_RESET)
        text = "".join(self.before) + left + self.token + right + "".join(self.after)
        return text.replace("\r", "\\r").replace("\n", "\\n")


def discover_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    layer: int,
    conversations: Sequence[Conversation],
    *,
    top_k: int = 10,
    skip_first: bool = True,
    specials: SpecialTokens | None = None,
    token_budget: int = 8192,
    max_len: int = 2048,
    progress: bool = True,
) -> FeatureReport:
    """Top `top_k` features per special/role token type, ranked by mean per-conversation max activation."""
    if top_k < 1:
        raise ConfigError(f"top_k must be positive, got {top_k}")
    specials = specials or resolve_special_tokens(tokenizer)
    sums: dict[str, torch.Tensor] = {}
    fires: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    n_conv = 0
    for _, ids, resid in _harvest(
        model, tokenizer, sae, layer, conversations, token_budget, max_len, progress
    ):
        n_conv += 1
        groups: dict[str, list[int]] = {}
        for pos, label in enumerate(specials.labels(ids)):
            if label is not None and not (skip_first and pos == SINK_POSITION):
                groups.setdefault(label, []).append(pos)
        if not groups:
            continue
        positions = [p for ps in groups.values() for p in ps]
        with torch.no_grad():
            acts = sae.encode(resid[positions].to(sae.device)).float().cpu()
        start = 0
        for label, ps in groups.items():
            best = acts[start : start + len(ps)].amax(dim=0).double()
            start += len(ps)
            if label not in sums:
                sums[label] = torch.zeros(sae.d_sae, dtype=torch.float64)
                fires[label] = torch.zeros(sae.d_sae, dtype=torch.float64)
                counts[label] = 0
            sums[label] += best
            fires[label] += best > 0
            counts[label] += 1
    order = {name: i for i, (_, name) in enumerate(specials.names)}
    report = FeatureReport(layer, n_conv, top_k, skip_first, specials.to_dict())
    for label in sorted(sums, key=lambda name: order.get(name, len(order))):
        means = sums[label] / counts[label]
        values, idx = means.topk(min(top_k, sae.d_sae))
        rate = fires[label] / counts[label]
        top = [
            FeatureStat(int(i), float(v), float(rate[i]))
            for v, i in zip(values, idx, strict=True)
            if float(v) > 0
        ]
        report.token_types.append(TokenTypeFeatures(label, counts[label], top))
    return report


def top_contexts(
    feature: int,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    layer: int,
    conversations: Sequence[Conversation],
    *,
    k: int = 10,
    window: int = 12,
    skip_first: bool = True,
    specials: SpecialTokens | None = None,
    token_budget: int = 8192,
    max_len: int = 2048,
    progress: bool = True,
) -> list[FeatureContext]:
    """The `k` conversations where `feature` is strongest (one context each), strongest first.

    Each context has the activating token and up to `window` tokens on each side. Conversations
    where the feature never fires are left out, so fewer than `k` may come back.
    """
    if not 0 <= feature < sae.d_sae:
        raise ConfigError(f"feature {feature} out of range: the SAE has features 0..{sae.d_sae - 1}")
    if k < 1 or window < 0:
        raise ConfigError(f"k must be positive and window non-negative, got k={k}, window={window}")
    specials = specials or resolve_special_tokens(tokenizer)
    best: list[tuple[float, int, int, list[int]]] = []
    for index, ids, resid in _harvest(
        model, tokenizer, sae, layer, conversations, token_budget, max_len, progress
    ):
        first = SINK_POSITION + 1 if skip_first else 0
        acts = feature_activations(sae, resid[first:], feature)
        if not len(acts):
            continue
        value, pos = acts.max(dim=0)
        if float(value) > 0:
            best.append((float(value), index, int(pos) + first, ids))
    best.sort(key=lambda item: (-item[0], item[1]))
    out = []
    for value, index, pos, ids in best[:k]:
        pieces = [tokenizer.decode([t]) for t in ids[max(0, pos - window) : pos + window + 1]]
        centre = pos - max(0, pos - window)
        out.append(
            FeatureContext(
                conversation=index,
                position=pos,
                activation=value,
                token=pieces[centre],
                before=pieces[:centre],
                after=pieces[centre + 1 :],
                label=specials.labels(ids[: pos + 1])[pos],
            )
        )
    return out


def feature_activations(sae: SAE, x: torch.Tensor, feature: int) -> torch.Tensor:
    """Activations `[n]` of one feature on residuals `[n, d_in]`, float32 on the CPU.

    Through the architecture's `feature_encoder` (ReLU / JumpReLU: that feature's encoder column only).
    """
    with torch.no_grad():
        return sae.feature_encoder([feature])(x.to(sae.device))[:, 0].float().cpu()


def _harvest(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    layer: int,
    conversations: Sequence[Conversation],
    token_budget: int,
    max_len: int,
    progress: bool,
) -> Iterator[tuple[int, list[int], torch.Tensor]]:
    """(conversation index, token ids, float32 residuals [len, d]) per conversation, forward stopped at `layer`."""
    if not conversations:
        raise ConfigError("no conversations given")
    harvester = Harvester(model, layer)
    if harvester.d_in != sae.d_in:
        raise ConfigError(
            f"the SAE reads d_in={sae.d_in} but the model's residual stream has {harvester.d_in} dimensions; "
            "use the SAE with the model it was trained on"
        )
    sequences = fast_sequences(conversations, tokenizer, max_len=max_len)
    batches = bucket_batches(sequences, token_budget, pad_token_id(tokenizer), seed=None)
    bar = tqdm(total=sum(len(s) for s in sequences), unit="tok", desc="features", disable=not progress)
    with bar:
        for batch in batches:
            for index, resid in zip(batch.indices, harvester.per_sequence(batch), strict=True):
                yield index, sequences[index], resid
            bar.update(batch.n_tokens)


def special_residual_norm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layer: int,
    conversations: list[list[dict[str, str]]],
    token_budget: int = 8192,
) -> float:
    """The strength scale `R` of a layer: `special_norm_median` of its residuals on `conversations`
    (each rendered with the chat template, truncated at 2048 tokens)."""
    specials = resolve_special_tokens(tokenizer)
    harvester = Harvester(model, layer)
    sequences = fast_sequences(conversations, tokenizer, max_len=2048)

    def rows() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in bucket_batches(sequences, token_budget, pad_token_id(tokenizer), seed=0):
            for row, resid in enumerate(harvester.per_sequence(batch)):
                yield resid, specials.mask(batch.input_ids[row, : batch.lengths[row]])

    return special_norm_median(rows())


def special_norm_median(rows: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Median L2 norm of residuals at special positions, the attention sink left out: the statistic of the
    steering strength scale (`apps.evaluation.primitives`). `rows`: (residuals `[len, d]`, special mask
    `[len]`) per sequence, read one at a time."""
    norms = [resid[without_sink(mask).to(resid.device)].float().norm(dim=-1) for resid, mask in rows]
    values = torch.cat(norms) if norms else torch.empty(0)
    if values.numel() == 0:
        raise ConfigError("no special-token positions (besides position 0) in the conversations given")
    return float(values.median())


def top_anchor_feature(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sae: SAE,
    layer: int,
    conversations: list[list[dict[str, str]]],
    progress: bool = True,
) -> tuple[int, float]:
    """The SAE feature with the largest mean max activation on the chat template's turn-opening token (App. F:
    `<|im_start|>` in ChatML, `<|start_header_id|>` in Llama 3, `<start_of_turn>` in Gemma, ...; see
    `steer.chat_template.turn_opening_token`), and that value."""
    specials = resolve_special_tokens(tokenizer)
    anchor = turn_opening_token(tokenizer, specials)
    report = discover_features(
        model, tokenizer, sae, layer, conversations, top_k=5, specials=specials, progress=progress
    )
    top = report.top(anchor)
    if not top:
        raise ConfigError(
            f"no feature of the SAE fires on {anchor} outside position 0 in the {len(conversations)} "
            "conversations given (it reconstructs those positions from b_dec alone); steer with another SAE "
            "(--sae, e.g. the jumprelu one of the same run) or name a feature (--feature K)"
        )
    return top[0].feature, top[0].mean_max_activation

"""What a collection holds for one feature: context windows around its activations, its density and histogram.

These are the records every interpretability stage reads (`train.interp.collect` writes them, `apps.interp`
scores them). A window is a slice of one conversation, rendered alone with the model's chat template (FAST),
centred on the position where the feature peaks; `activations` are the feature's values on every token of the
window (0 where it does not fire), and `special` marks the chat template's special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Window:
    """A context window of one conversation around one position (`peak`, an index into `tokens`)."""

    conversation: int  # index of the conversation in the collected corpus
    start: int  # absolute position of tokens[0] in the rendered conversation
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]  # one decoded string per token, special tokens literal (e.g. "<|im_start|>")
    activations: tuple[float, ...]  # the feature's activation on each token (0.0 where it does not fire)
    special: tuple[bool, ...]  # True on the chat template's special / role tokens
    peak: int

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def key(self) -> tuple[int, ...]:
        """Identity of the visible context: identical windows from different conversations are one example.

        The tokens from the window's start through the peak: in a causal model the activation at the peak
        depends on nothing after it, so windows whose peak follows the same text (the same default system
        prompt, say) are one example even where the text after the peak differs.
        """
        return self.token_ids[: self.peak + 1]


@dataclass
class FeatureExamples:
    """Everything collected for one feature."""

    feature: int
    top: list[
        Window
    ]  # top activating windows, strongest first, distinct conversations, deduplicated contexts
    deciles: list[
        list[Window]
    ]  # deciles[q]: sampled windows whose peak lies in activation decile q (0 = lowest)
    density: float  # share of collected tokens on which the feature fires (> 0)
    max_activation: float
    histogram_edges: list[float] = field(default_factory=list)  # activation histogram of firing tokens
    histogram_counts: list[int] = field(default_factory=list)
    top_token_counts: dict[str, int] = field(
        default_factory=dict
    )  # token string -> count among top windows' peaks
    count: int = 0  # firing tokens (activation > 0)
    decile_edges: list[float] = field(
        default_factory=list
    )  # 11 quantiles of the firing activations; deciles[q]'s peaks lie in [edges[q], edges[q + 1]]

    @property
    def live(self) -> bool:
        return self.max_activation > 0

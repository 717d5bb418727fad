"""Per-row token choice: each row of a batch samples with its own temperature, top-p and seeded generator,
so its reply never depends on its batch-mates (greedy rows take the argmax, as `generate` would)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded. temperature 0 = greedy; end of turn is impossible before `min_new_tokens`;
    `seed` starts the row's own generator (a request without one gets a random seed, shared by its rows);
    `logprobs`: alternatives per token (None: none)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the model, and the top alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...]


class RowSampler:
    """Chooses one row's next token from its logits (float32, one row)."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def choose(self, logits: torch.Tensor, best: int) -> tuple[int, TokenLogprob | None]:
        """The next token id (greedy: `best`, the argmax of `logits`), and its logprob entry if asked for."""
        if self.generator is None:
            token = best
        else:
            probs = torch.softmax(logits / self.params.temperature, dim=-1)
            if self.params.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= self.params.top_p  # keeps the first
                probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.params.logprobs is None:
            return token, None
        logprobs = torch.log_softmax(logits, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if self.params.logprobs:
            values, ids = logprobs.topk(self.params.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return token, TokenLogprob(float(logprobs[token]), top)

"""A small sample of conversations held in memory with their residuals at each SAE's layer.

The feature panel reads it for the layer's strength scale `R` (`train.features.special_norm_median`,
computed once per sample, i.e. once per model and layer) and for a feature's top-activating contexts,
without running the model again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from steer.errors import ConfigError
from steer.positions import SpecialTokens, pad_token_id
from train.features import special_norm_median
from train.harvest import Harvester
from train.sequences import make_batch, render_conversation


@dataclass
class ResidualSample:
    """Token ids, special-position masks and layer-L residuals (float32) of a few conversations."""

    layer: int
    token_ids: list[list[int]]
    special: list[list[bool]]
    residuals: list[torch.Tensor]  # [len_i, d_model] each

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @cached_property
    def scale_norm(self) -> float:
        """The strength scale `R` of this layer on the sample: the study's statistic (median residual norm at
        special positions, position 0 left out), so a demo strength adds what steer-eval's would."""
        return special_norm_median(
            (r, torch.tensor(mask, dtype=torch.bool))
            for r, mask in zip(self.residuals, self.special, strict=True)
        )


def sample_residuals(
    model,
    tokenizer,
    conversations: list[list[dict]],
    layer: int,
    special: SpecialTokens,
    max_len: int = 512,
    batch_size: int = 8,
) -> ResidualSample:
    """Residuals after decoder layer `layer` for each conversation (chat template, truncated at `max_len`)."""
    if not conversations:
        raise ConfigError("no conversations to sample residuals from")
    sequences = [render_conversation(tokenizer, conv)[:max_len] for conv in conversations]
    harvester = Harvester(model, layer)
    residuals: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = make_batch(sequences[start : start + batch_size], pad_token_id(tokenizer))
            residuals.extend(harvester.per_sequence(batch))
    masks = [special.mask(torch.tensor(ids)).tolist() for ids in sequences]
    return ResidualSample(layer=layer, token_ids=sequences, special=masks, residuals=residuals)

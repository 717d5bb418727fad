"""A small sample of conversations held in memory with their residuals at each SAE's layer.

The feature panel reads it for the layer's typical residual norm (the scale of the strength slider)
and for a feature's top-activating contexts, without running the model again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steer.positions import SpecialTokens
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

    def typical_norm(self) -> float:
        """Median L2 norm of the residuals, leaving out each sequence's first token (an outlier)."""
        norms = [r[1:].norm(dim=-1) for r in self.residuals if r.shape[0] > 1]
        if not norms:
            raise ValueError("the residual sample has no tokens after the first; give longer conversations")
        return float(torch.cat(norms).median())


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
        raise ValueError("no conversations to sample residuals from")
    sequences = [render_conversation(tokenizer, conv)[:max_len] for conv in conversations]
    harvester = Harvester(model, layer)
    residuals: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = make_batch(sequences[start : start + batch_size], tokenizer.pad_token_id)
            residuals.extend(harvester.per_sequence(batch))
    masks = [special.mask(torch.tensor(ids)).tolist() for ids in sequences]
    return ResidualSample(layer=layer, token_ids=sequences, special=masks, residuals=residuals)

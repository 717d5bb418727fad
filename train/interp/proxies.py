"""Judge-free proxies of what a feature means, from a collection and the SAE's weights alone.

Per feature:
- `top_token_share` / `top_token_entropy`: how concentrated the peak tokens of its top windows are (the share
  of the most common one; the entropy of their distribution in bits, divided by log2 of the number of
  windows, so 0 = one token, 1 = all different). High concentration means a lexical feature: easy to name,
  possibly trivial.
- `density`: the share of counted tokens it fires on (> 10 % reads as a dense, rarely interpretable feature).
- `nearest_feature` / `nearest_cosine`: its decoder-nearest other feature (cosine of the decoder rows),
  i.e. redundancy or feature splitting.
- `promoted` / `suppressed`: the logit lens of its decoder direction, `W_U @ W_dec[f]` with the model's
  unembedding (`lm_head.weight`) and *without* the final norm. The norm divides by a positive scalar, which
  ranks tokens the same; its per-dimension gain is left out as well, so the lens reads the direction as the
  residual stream writes it (TransformerLens would fold the gain into `W_U`; we record the choice instead).
- `special_share`: the share of its top windows whose peak is a chat-template special / role token.

None of these needs a judge, and all work for any SAE, a random-direction one included (the baseline that
tells whether a proxy says anything about interpretability at all).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.errors import ConfigError
from steer.sae import SAE
from train.interp.collection import Collection
from train.interp.examples import FeatureExamples

LOGIT_LENS = "W_U @ W_dec[f]: lm_head weight, no final norm (neither its scale nor its gain)"
NEIGHBOUR_BLOCK = 1024  # decoder rows compared at once


@dataclass
class FeatureProxies:
    """The judge-free proxies of one feature (see the module docstring)."""

    feature: int
    density: float
    top_token: str | None  # the most common peak token of the top windows
    top_token_share: float
    top_token_entropy: float
    special_share: float
    nearest_feature: int
    nearest_cosine: float
    promoted: list[tuple[str, float]] = field(default_factory=list)  # top logit-lens tokens, largest first
    suppressed: list[tuple[str, float]] = field(default_factory=list)  # most negative first


def peak_concentration(examples: FeatureExamples) -> tuple[str | None, float, float, float]:
    """(most common peak token, its share, normalised entropy, special share) over the top windows."""
    peaks = [w.tokens[w.peak] for w in examples.top]
    if not peaks:
        return None, 0.0, 0.0, 0.0
    counts = Counter(peaks)
    token, most = counts.most_common(1)[0]
    n = len(peaks)
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    normalised = entropy / math.log2(n) if n > 1 else 0.0
    special = sum(w.special[w.peak] for w in examples.top) / n
    return token, most / n, normalised, special


def decoder_neighbours(sae: SAE, features: Sequence[int], k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, cosine), each [len(features), k]: every feature's `k` nearest other decoder rows, nearest
    first."""
    with torch.no_grad():
        unit = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
        chosen = torch.as_tensor(list(features), dtype=torch.long, device=unit.device)
        k = min(k, max(len(unit) - 1, 1))
        index, cosine = [], []
        for block in chosen.split(NEIGHBOUR_BLOCK):
            sims = unit[block] @ unit.T
            sims[torch.arange(len(block)), block] = -math.inf
            value, where = sims.topk(k, dim=-1)
            index.append(where.cpu())
            cosine.append(value.cpu())
    empty = torch.zeros(0, k)
    return torch.cat(index or [empty.long()]), torch.cat(cosine or [empty])


def unembedding(model: PreTrainedModel) -> torch.Tensor:
    """The model's unembedding matrix `W_U` [vocab, d_model] (`lm_head.weight`, tied or not)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output embedding (lm_head) for the logit lens")
    return head.weight


def logit_lens(
    sae: SAE, w_u: torch.Tensor, features: Sequence[int], k: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`k` promoted (values, ids) and suppressed (values, ids) tokens of `W_U @ W_dec[f]` per feature."""
    if w_u.shape[-1] != sae.d_in:
        raise ConfigError(f"the unembedding has width {w_u.shape[-1]} but the SAE writes d_in={sae.d_in}")
    with torch.no_grad():
        rows = sae.W_dec.detach()[list(features)].to(w_u.device, torch.float32)
        logits = rows @ w_u.detach().float().T  # [n, vocab]
        k = min(k, logits.shape[-1])
        up = logits.topk(k, dim=-1)
        down = logits.topk(k, dim=-1, largest=False)
    return up.values.cpu(), up.indices.cpu(), down.values.cpu(), down.indices.cpu()


def feature_proxies(
    collection: Collection,
    sae: SAE,
    features: Sequence[int],
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    k: int = 10,
) -> list[FeatureProxies]:
    """The proxies of `features` of `sae`, whose examples are in `collection` (made from `sae`)."""
    if collection.d_sae != sae.d_sae:
        raise ConfigError(f"the collection has {collection.d_sae} features but the SAE {sae.d_sae}")
    features = list(features)
    nearest, cosine = decoder_neighbours(sae, features)
    up_v, up_i, down_v, down_i = logit_lens(sae, unembedding(model), features, k)

    def named(values: torch.Tensor, ids: torch.Tensor) -> list[tuple[str, float]]:
        strings = tokenizer.batch_decode([[t] for t in ids.tolist()])
        return list(zip(strings, values.tolist(), strict=True))

    out = []
    for row, f in enumerate(features):
        token, share, entropy, special = peak_concentration(collection.feature(f))
        out.append(
            FeatureProxies(
                feature=f,
                density=float(collection.density[f]),
                top_token=token,
                top_token_share=share,
                top_token_entropy=entropy,
                special_share=special,
                nearest_feature=int(nearest[row, 0]),
                nearest_cosine=float(cosine[row, 0]),
                promoted=named(up_v[row], up_i[row]),
                suppressed=named(down_v[row], down_i[row]),
            )
        )
    return out

"""The random-direction SAE at matched L0: what the judge and the proxies give features that mean nothing.

It has the real SAE's architecture, width, normalisation, `b_dec` and layer; its decoder rows are random unit
vectors (seeded), its encoder is their transpose, and its sparsity is set so that its mean L0 on the collected
tokens matches the real SAE's (`collection.json` `stats.mean_l0`):
- jumprelu: each feature's threshold is the (1 - L0 / d_sae) quantile of its pre-activation on a sample of the
  collected tokens (at least 0), so every feature fires on the same share of tokens;
- standard (ReLU): `b_enc` is minus that quantile;
- topk: `k` is kept (its L0 is k by construction).
It is saved as an SAE folder (`hub.sae_io.save_sae`) so that the same collection path keys, collects and reads
it. Its metadata records what it was made from; a rerun with the same real SAE, collection and seed reuses
the folder as it is (same weights, so the same collection and judge cache).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hub.formats import CFG_FILE
from hub.sae_io import sae_layer, save_sae
from steer.errors import ConfigError
from steer.sae import SAE, build_sae
from train.harvest import Harvester
from train.interp.collection import Collection
from train.sequences import bucket_batches

FOLDER = "random-sae"  # under the run's OUT
CALIBRATION_TOKENS = 65_536  # collected tokens the thresholds are set on (the first conversations)
FEATURE_BLOCK = 1024  # features whose pre-activations are held at once while calibrating
PROVENANCE = "random_direction_baseline"  # the metadata key recording what the baseline was made from


def random_direction_sae(real: SAE, residuals: torch.Tensor, target_l0: float, seed: int) -> SAE:
    """A random-direction SAE shaped like `real`, its sparsity set on `residuals [n, d_in]` so that its mean
    L0 there is about `target_l0` (see the module docstring); float32, on `residuals`' device."""
    if not 0 < target_l0 <= real.d_sae:
        raise ConfigError(f"target L0 must lie in (0, d_sae={real.d_sae}], got {target_l0}")
    if residuals.ndim != 2 or residuals.shape[1] != real.d_in or len(residuals) < 2:
        raise ConfigError(
            f"calibration residuals must be [n >= 2, d_in={real.d_in}], got {tuple(residuals.shape)}"
        )
    sae = build_sae(replace(real.cfg, dtype="float32", device="cpu", metadata=dict(real.cfg.metadata)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        directions = torch.randn(real.d_sae, real.d_in, generator=generator)
        sae.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(real.b_dec.detach().float().cpu())
    sae = sae.to(residuals.device)
    if sae.cfg.architecture == "topk":
        return sae
    if sae.cfg.architecture not in ("jumprelu", "standard"):
        raise ConfigError(f"no matched-L0 rule for the {sae.cfg.architecture!r} architecture")
    cut = _quantiles(sae, residuals.float(), target_l0 / real.d_sae)
    with torch.no_grad():
        if sae.cfg.architecture == "standard":
            sae.b_enc.copy_(-cut)
        else:
            sae.threshold.copy_(cut)
    return sae


def _quantiles(sae: SAE, residuals: torch.Tensor, density: float) -> torch.Tensor:
    """Per feature, the pre-activation value exceeded by a `density` share of `residuals` (at least 0)."""
    n = len(residuals)
    above = min(max(1, round(density * n)), n - 1)
    with torch.no_grad():
        x = sae.encoder_input(residuals)
        cuts = [
            torch.kthvalue(
                x @ sae.W_enc[:, a : a + FEATURE_BLOCK] + sae.b_enc[a : a + FEATURE_BLOCK], n - above, 0
            ).values
            for a in range(0, sae.d_sae, FEATURE_BLOCK)
        ]
    return torch.cat(cuts).clamp_min(0.0)


def calibration_residuals(
    collection: Collection, model: PreTrainedModel, layer: int, max_tokens: int = CALIBRATION_TOKENS
) -> torch.Tensor:
    """float32 residuals after `layer` of the first collected conversations, up to `max_tokens` counted
    tokens (position 0 left out where the collection leaves it out)."""
    first = 1 if collection.manifest["settings"]["skip_first"] else 0
    offsets = collection.offsets
    sequences, counted = [], 0
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        if counted >= max_tokens:
            break
        if b - a > first:
            sequences.append(collection.token_ids[a:b].tolist())
            counted += b - a - first
    if counted < 2:
        raise ConfigError(f"the collection in {collection.folder} has too few tokens to calibrate a baseline")
    harvester = Harvester(model, layer)
    pad = 0  # right padding never reaches a real token's residual in a causal model
    token_budget = collection.manifest["settings"]["token_budget"]
    parts = [
        r[first:]
        for batch in bucket_batches(sequences, token_budget, pad, seed=None)
        for r in harvester.per_sequence(batch)
    ]
    return torch.cat(parts)[:max_tokens]


def baseline_sae(
    real_folder: str | Path, real: SAE, collection: Collection, model: PreTrainedModel, out: Path, seed: int
) -> Path:
    """The folder of the matched-L0 random-direction baseline of `real` (made from `collection`, reused when
    `out/random-sae` already holds the one for the same SAE, collection and seed)."""
    stats = collection.manifest["stats"]
    provenance = {
        "of_sae": collection.manifest["sae"]["digest"],
        "of_folder": str(real_folder),
        "collection": collection.manifest["key"],
        "seed": seed,
        "target_l0": stats["mean_l0"],
        "calibration_tokens": min(CALIBRATION_TOKENS, stats["tokens_counted"]),
        "rule": "unit random decoder rows, encoder = decoder transpose, b_dec copied; per-feature "
        "thresholds at the (1 - L0/d_sae) pre-activation quantile (standard: b_enc = -quantile; topk: same k)",
    }
    folder = out / FOLDER
    if _recorded(folder) == provenance:
        return folder
    layer = sae_layer(real)
    if layer is None:
        raise ConfigError(f"the SAE in {real_folder} names no residual-stream layer in its metadata")
    device = next(model.parameters()).device
    residuals = calibration_residuals(collection, model, layer).to(device)
    sae = random_direction_sae(real, residuals, float(stats["mean_l0"]), seed)
    sae.cfg.metadata[PROVENANCE] = provenance
    return save_sae(sae.to("cpu"), folder)


def _recorded(folder: Path) -> dict[str, Any] | None:
    """The provenance a saved baseline records (None when there is none)."""
    path = folder / CFG_FILE
    if not path.is_file():
        return None
    return (json.loads(path.read_text(encoding="utf-8")).get("metadata") or {}).get(PROVENANCE)


def matched(real_l0: float, baseline_l0: float) -> dict[str, Any]:
    """How close the baseline's mean L0 on the collected tokens came to the real SAE's."""
    return {
        "real_mean_l0": real_l0,
        "baseline_mean_l0": baseline_l0,
        "ratio": baseline_l0 / real_l0 if real_l0 else None,
    }

"""Gradient signal-to-noise ratio (Liu et al. 2020) of an SAE's weights, measured over micro-batches.

Per parameter element j: `GSNR_j = mean_b(g_bj)^2 / var_b(g_bj)` over the gradients `g_b` of `m`
micro-batches of one training batch; reported as the average over the elements of `W_enc` and of
`W_dec` (elements whose gradient never varies, e.g. of features that never fired, are left out). The
later version of the FAST paper argues that FAST's data give higher GSNR than block training.
"""

from __future__ import annotations

import torch

from train.losses import Objective

GSNR_PARAMETERS = ("W_enc", "W_dec")


def gradient_snr(
    objective: Objective, x: torch.Tensor, coefficient: float, dead: torch.Tensor, micro_batches: int
) -> dict[str, torch.Tensor]:
    """`{"gsnr_W_enc": ..., "gsnr_W_dec": ...}` (0-d tensors) over `micro_batches` equal slices of `x`."""
    if micro_batches < 2 or len(x) < micro_batches:
        raise ValueError(
            f"GSNR needs at least 2 micro-batches of a token each, got {micro_batches} for {len(x)}"
        )
    params = [getattr(objective.sae, name) for name in GSNR_PARAMETERS]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    squares = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for part in x.tensor_split(micro_batches):
        grads = torch.autograd.grad(objective(part, coefficient, dead).loss, params)
        for s, q, g in zip(total, squares, grads, strict=True):
            g = g.detach().double()
            s += g
            q += g * g
    out = {}
    for name, s, q in zip(GSNR_PARAMETERS, total, squares, strict=True):
        mean = s / micro_batches
        var = (q / micro_batches - mean * mean).clamp_min(0) * micro_batches / (micro_batches - 1)
        varies = var > 1e-30
        ratio = (mean[varies] ** 2 / var[varies]).mean() if bool(varies.any()) else mean.new_zeros(())
        out[f"gsnr_{name}"] = ratio.float()
    return out

"""Training objectives per architecture, as in SAELens 5.x / 6.x training SAEs.

* standard: MSE (summed over d_in, mean over tokens) + L1 of the feature activations weighted by the
  decoder row norms.
* jumprelu: MSE + L0 penalty; the threshold is `exp(log_threshold)` and gets gradients through a
  straight-through estimator with a rectangle kernel of width `bandwidth` (Rajamanoharan et al. 2024).
* topk: MSE + the auxiliary-k loss (Gao et al. 2024): the top `d_in // 2` dead latents reconstruct the
  residual error.

An objective wraps one `steer` SAE and owns any extra training-only parameters (`log_threshold`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steer.sae import SAE
from train.config import SAETrainSpec
from train.fused_losses import JumpReLULossFn, StandardLossFn


def rectangle(x: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel: 1 on (-1/2, 1/2), else 0."""
    return ((x > -0.5) & (x < 0.5)).to(x)


class JumpReLUFn(torch.autograd.Function):
    """`x * (x > threshold)`; gradient to x is the mask, to the threshold the rectangle-kernel STE."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        x_grad = (x > threshold) * grad_out
        threshold_grad = torch.sum(-(threshold / bw) * rectangle((x - threshold) / bw) * grad_out, dim=0)
        return x_grad, threshold_grad, None


class StepFn(torch.autograd.Function):
    """Heaviside `x > threshold`; gradient only to the threshold, `-(1/bandwidth) K((x - t)/bandwidth)`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        threshold_grad = torch.sum(-(1.0 / bw) * rectangle((x - threshold) / bw) * grad_out, dim=0)
        return None, threshold_grad, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the SAE's matmuls run in on `x`: the autocast dtype where autocast is on, else `x`'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def mse_loss(sae_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error summed over d_in, averaged over tokens (SAELens `mse_loss`)."""
    return (sae_out.float() - x.float()).pow(2).sum(dim=-1).mean()


@dataclass
class LossOutput:
    loss: torch.Tensor
    mse: torch.Tensor
    penalty: torch.Tensor  # the sparsity (standard, jumprelu) or auxiliary (topk) term, coefficient applied
    feature_acts: torch.Tensor
    # [d_sae] sums over tokens of non-negative activations, where the objective computes them anyway
    activation_sums: torch.Tensor | None = None

    def fired(self) -> torch.Tensor:
        """[d_sae] bool: the features with a positive activation in the batch."""
        if self.activation_sums is not None:  # a sum of non-negative terms is positive iff one of them is
            return self.activation_sums > 0
        return self.feature_acts.amax(dim=0) > 0  # one reduction: no [batch, d_sae] comparison mask


class Objective(nn.Module):
    """The loss of one SAE and the parameters it trains."""

    def __init__(self, sae: SAE, spec: SAETrainSpec) -> None:
        super().__init__()
        self.sae = sae
        self.spec = spec

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.sae.named_parameters() if n in ("W_enc", "b_enc", "W_dec", "b_dec")}

    def forward(self, x: torch.Tensor, coefficient: float, dead_mask: torch.Tensor | None) -> LossOutput:
        raise NotImplementedError

    def plain_setup(self, x: torch.Tensor) -> bool:
        """Whether the encoder reads `x` as it is: no input normalisation, no `b_dec`, the SAE's dtype."""
        cfg = self.sae.cfg
        return (
            cfg.normalize_activations == "none" and not cfg.apply_b_dec_to_input and x.dtype == self.sae.dtype
        )

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations; one fused `addmm` in the plain training set-up."""
        if self.plain_setup(x):
            return torch.addmm(self.sae.b_enc, x, self.sae.W_enc)
        return self.sae.hidden_pre(x)

    def sync_to_sae(self) -> None:
        """Write training-only parameters into the inference SAE (e.g. `threshold = exp(log_threshold)`)."""


class StandardObjective(Objective):
    def forward(
        self, x: torch.Tensor, coefficient: float, dead_mask: torch.Tensor | None = None
    ) -> LossOutput:
        if self.plain_setup(x):
            sae = self.sae
            return LossOutput(
                *StandardLossFn.apply(
                    x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, coefficient, compute_dtype(x)
                )
            )
        feature_acts = torch.relu(self.hidden_pre(x))
        sae_out = self.sae.decode(feature_acts)
        mse = mse_loss(sae_out, x)
        # mean over tokens of sum_j f_j ||W_dec[j]||, as one reduction over the batch
        norms = self.sae.W_dec.norm(dim=1)
        penalty = coefficient * (feature_acts.sum(dim=0, dtype=norms.dtype) @ norms) / x.shape[0]
        return LossOutput(mse + penalty, mse, penalty, feature_acts)


class JumpReLUObjective(Objective):
    def __init__(self, sae: SAE, spec: SAETrainSpec) -> None:
        super().__init__(sae, spec)
        init = torch.full((sae.d_sae,), math.log(spec.jumprelu_init_threshold), dtype=sae.dtype)
        self.log_threshold = nn.Parameter(init.to(sae.device))
        self.sae.threshold.requires_grad_(False)
        self.sync_to_sae()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().trainable_parameters(), "log_threshold": self.log_threshold}

    def forward(
        self, x: torch.Tensor, coefficient: float, dead_mask: torch.Tensor | None = None
    ) -> LossOutput:
        bw = self.spec.jumprelu_bandwidth
        if self.plain_setup(x):
            sae = self.sae
            return LossOutput(
                *JumpReLULossFn.apply(
                    x,
                    sae.W_enc,
                    sae.b_enc,
                    sae.W_dec,
                    sae.b_dec,
                    self.log_threshold,
                    coefficient,
                    bw,
                    compute_dtype(x),
                )
            )
        hidden_pre = self.hidden_pre(x)
        threshold = self.log_threshold.exp()
        feature_acts = JumpReLUFn.apply(hidden_pre, threshold, bw)
        sae_out = self.sae.decode(feature_acts)
        mse = mse_loss(sae_out, x)
        l0 = StepFn.apply(hidden_pre, threshold, bw).sum(dim=-1)
        penalty = (coefficient * l0).mean()
        return LossOutput(mse + penalty, mse, penalty, feature_acts)

    @torch.no_grad()
    def sync_to_sae(self) -> None:
        self.sae.threshold.copy_(self.log_threshold.exp())


class TopKObjective(Objective):
    def forward(
        self, x: torch.Tensor, coefficient: float, dead_mask: torch.Tensor | None = None
    ) -> LossOutput:
        hidden_pre = self.hidden_pre(x)
        feature_acts = self.sae.activation(hidden_pre)
        sae_out = self.sae.decode(feature_acts)
        mse = mse_loss(sae_out, x)
        aux = topk_aux_loss(x, sae_out, hidden_pre, self.sae.W_dec, dead_mask)
        penalty = self.spec.aux_k_coefficient * aux
        return LossOutput(mse + penalty, mse, penalty, feature_acts)


def topk_aux_loss(
    x: torch.Tensor,
    sae_out: torch.Tensor,
    hidden_pre: torch.Tensor,
    W_dec: torch.Tensor,
    dead_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Auxiliary-k loss: the top `k_aux = d_in // 2` dead latents reconstruct the (detached) residual,
    scaled by `min(n_dead / k_aux, 1)`; zero when no feature is dead."""
    if dead_mask is None or not bool(dead_mask.any()):
        return torch.zeros((), dtype=torch.float32, device=x.device)
    n_dead = int(dead_mask.sum())
    k_aux = x.shape[-1] // 2
    scale = min(n_dead / k_aux, 1.0)
    k_aux = min(k_aux, n_dead)
    residual = (x.float() - sae_out.float()).detach()
    masked = torch.where(dead_mask[None], hidden_pre, torch.full_like(hidden_pre, -torch.inf))
    top = masked.topk(k_aux, dim=-1, sorted=False)
    aux_acts = torch.zeros_like(hidden_pre).scatter_(-1, top.indices, top.values.relu())
    recon = aux_acts @ W_dec
    return scale * (recon.float() - residual).pow(2).sum(dim=-1).mean()


_OBJECTIVES: dict[str, type[Objective]] = {
    "standard": StandardObjective,
    "jumprelu": JumpReLUObjective,
    "topk": TopKObjective,
}


def build_objective(sae: SAE, spec: SAETrainSpec) -> Objective:
    """The training objective for `sae` (whose architecture must match `spec.arch`)."""
    if sae.architecture != spec.arch:
        raise ValueError(f"SAE architecture {sae.architecture!r} does not match the spec's {spec.arch!r}")
    return _OBJECTIVES[spec.arch](sae, spec)

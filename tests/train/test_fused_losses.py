"""The standard and JumpReLU losses' hand-derived backwards against autograd on the same formulas."""

from __future__ import annotations

import math

import pytest
import torch

from train.fused_losses import JumpReLULossFn, StandardLossFn
from train.losses import JumpReLUFn, StepFn, mse_loss

BANDWIDTH = 0.4  # wide enough that many pre-activations fall in the threshold's window


def _params(
    arch: str, dtype: torch.dtype, d_in: int = 12, d_sae: int = 40, seed: int = 0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=dtype) * 0.4
    b_enc = torch.randn(d_sae, generator=g, dtype=dtype) * 0.3
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=dtype) * (torch.rand(d_sae, 1, generator=g) + 0.5)
    W_dec[3] = 0  # a zero decoder row: its penalty gradient is zero, not NaN
    b_dec = torch.randn(d_in, generator=g, dtype=dtype) * 0.1
    params = [W_enc, b_enc, W_dec, b_dec]
    if arch == "jumprelu":
        params.append((torch.rand(d_sae, generator=g, dtype=dtype) * 0.6 + 0.2).log())  # log thresholds
    return [p.requires_grad_() for p in params]


def _reference(arch: str, x, c: float, W_enc, b_enc, W_dec, b_dec, log_threshold=None):
    """`train.losses`' graphs, differentiated by autograd."""
    h = x @ W_enc + b_enc
    if arch == "standard":
        f = torch.relu(h)
        penalty = c * (f * W_dec.norm(dim=1)).sum(-1).mean()
    else:
        threshold = log_threshold.exp()
        f = JumpReLUFn.apply(h, threshold, BANDWIDTH)
        penalty = (c * StepFn.apply(h, threshold, BANDWIDTH).sum(-1)).mean()
    mse = mse_loss(f @ W_dec + b_dec, x)
    return mse + penalty, mse, penalty, f


def _fused(arch: str, x, c: float, params, dtype: torch.dtype):
    if arch == "standard":
        return StandardLossFn.apply(x, *params, c, dtype)
    return JumpReLULossFn.apply(x, *params, c, BANDWIDTH, dtype)


def _grads(output: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, params, allow_unused=True)  # the penalty does not reach b_dec
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
@pytest.mark.parametrize("which", [0, 1, 2])  # loss, mse alone, penalty alone
def test_gradients_equal_autograd_in_float64(arch: str, which: int):
    params = _params(arch, torch.float64)
    x = torch.randn(9, 12, dtype=torch.float64) * 2
    *ours, sums = _fused(arch, x, 2.5, params, torch.float64)
    ref = _reference(arch, x, 2.5, *params)
    torch.testing.assert_close(sums, ref[3].sum(0).float())
    for a, b in zip(ours, ref, strict=True):  # the MSE and penalty in float32, as `train.losses.mse_loss`
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-6, atol=0)
    for a, b in zip(_grads(ours[which], params), _grads(ref[which], params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the MSE's float32 rounding
        assert torch.isfinite(a).all()


def test_jumprelu_threshold_gradient_has_both_estimator_terms():
    params = _params("jumprelu", torch.float64, seed=3)
    x = torch.randn(64, 12, dtype=torch.float64)
    grads = {}
    for which, name in ((1, "mse"), (2, "penalty")):
        grads[name] = _grads(_fused("jumprelu", x, 1.0, params, torch.float64)[which], params)[-1]
    assert (grads["mse"] != 0).sum() > 5 and (grads["penalty"] < 0).sum() > 5  # the window is not empty
    # the L0 term alone: -(c / B / bw) * (tokens in the window) * theta, per feature
    h = x @ params[0] + params[1]
    theta = params[4].exp()
    in_window = ((h - theta).abs() < BANDWIDTH / 2).sum(0)
    torch.testing.assert_close(grads["penalty"], -(1.0 / 64 / BANDWIDTH) * in_window * theta)


def test_a_combination_of_outputs_gets_the_summed_gradient():
    for arch in ("standard", "jumprelu"):
        params = _params(arch, torch.float64, seed=1)
        x = torch.randn(5, 12, dtype=torch.float64)
        loss, mse, penalty, *_ = _fused(arch, x, 0.7, params, torch.float64)
        r_loss, r_mse, r_penalty, _ = _reference(arch, x, 0.7, *params)
        ours = _grads(loss + 2 * mse - penalty, params)
        for a, b in zip(ours, _grads(r_loss + 2 * r_mse - r_penalty, params), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_bfloat16_compute_is_as_close_to_float64_as_autograd_under_autocast(arch: str):
    params = _params(arch, torch.float32, d_in=64, d_sae=256, seed=2)
    x = torch.randn(128, 64) * 2
    *ours, _ = _fused(arch, x, 1.0, params, torch.bfloat16)
    assert ours[3].dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _reference(arch, x, 1.0, *params)
    exact_params = [p.detach().double().requires_grad_() for p in params]
    exact = _reference(arch, x.double(), 1.0, *exact_params)  # the MSE in float32: close enough here
    torch.testing.assert_close(ours[0].double(), exact[0], rtol=1e-2, atol=0)
    exact_grads = _grads(exact[0], exact_params)
    for a, b, e in zip(_grads(ours[0], params), _grads(autocast[0], params), exact_grads, strict=True):
        assert a.dtype == torch.float32 and a.is_contiguous()
        assert (a.double() - e).norm() <= 1.5 * (b.double() - e).norm() + 1e-3 * e.norm()


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_input_that_wants_a_gradient_is_refused(arch: str):
    params = _params(arch, torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient to the input"):
        _fused(arch, x, 1.0, params, torch.float64)


def test_jumprelu_activations_are_the_pre_activations_above_the_threshold():
    params = _params("jumprelu", torch.float64, seed=4)
    x = torch.randn(32, 12, dtype=torch.float64)
    acts = _fused("jumprelu", x, 1.0, params, torch.float64)[3]
    h = x @ params[0] + params[1]
    torch.testing.assert_close(acts, h * (h > params[4].exp()))
    assert math.isclose(float(acts.count_nonzero()), float((h > params[4].exp()).sum()))

"""The standard SAE's hand-derived backward against autograd on the same formula."""

from __future__ import annotations

import pytest
import torch

from train.losses import mse_loss
from train.standard_loss import StandardLossFn


def _params(dtype: torch.dtype, d_in: int = 12, d_sae: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=dtype) * 0.4
    b_enc = torch.randn(d_sae, generator=g, dtype=dtype) * 0.3
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=dtype) * (torch.rand(d_sae, 1, generator=g) + 0.5)
    W_dec[3] = 0  # a zero decoder row: its penalty gradient is zero, not NaN
    b_dec = torch.randn(d_in, generator=g, dtype=dtype) * 0.1
    return [p.requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]


def _reference(x, W_enc, b_enc, W_dec, b_dec, c: float):
    f = torch.relu(x @ W_enc + b_enc)
    mse = mse_loss(f @ W_dec + b_dec, x)
    penalty = c * (f * W_dec.norm(dim=1)).sum(-1).mean()
    return mse + penalty, mse, penalty, f


def _grads(output: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, params, allow_unused=True)  # the penalty does not reach b_dec
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


@pytest.mark.parametrize("which", [0, 1, 2])  # loss, mse alone, penalty alone
def test_gradients_equal_autograd_in_float64(which: int):
    params = _params(torch.float64)
    x = torch.randn(9, 12, dtype=torch.float64) * 2
    *ours, sums = StandardLossFn.apply(x, *params, 2.5, torch.float64)
    ref = _reference(x, *params, 2.5)
    torch.testing.assert_close(sums, ref[3].sum(0).float())
    for a, b in zip(ours, ref, strict=True):  # the MSE and penalty in float32, as `train.losses.mse_loss`
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-6, atol=0)
    for a, b in zip(_grads(ours[which], params), _grads(ref[which], params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the MSE's float32 rounding
        assert torch.isfinite(a).all()


def test_a_combination_of_outputs_gets_the_summed_gradient():
    params = _params(torch.float64, seed=1)
    x = torch.randn(5, 12, dtype=torch.float64)
    loss, mse, penalty, *_ = StandardLossFn.apply(x, *params, 0.7, torch.float64)
    r_loss, r_mse, r_penalty, _ = _reference(x, *params, 0.7)
    ours = _grads(loss + 2 * mse - penalty, params)
    for a, b in zip(ours, _grads(r_loss + 2 * r_mse - r_penalty, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_is_as_close_to_float64_as_autograd_under_autocast():
    params = _params(torch.float32, d_in=64, d_sae=256, seed=2)
    x = torch.randn(128, 64) * 2
    *ours, _ = StandardLossFn.apply(x, *params, 1.0, torch.bfloat16)
    assert ours[3].dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _reference(x, *params, 1.0)
    exact_params = [p.detach().double().requires_grad_() for p in params]
    exact = _reference(x.double(), *exact_params, 1.0)  # the MSE in float32: close enough here
    torch.testing.assert_close(ours[0].double(), exact[0], rtol=1e-2, atol=0)
    exact_grads = _grads(exact[0], exact_params)
    for a, b, e in zip(_grads(ours[0], params), _grads(autocast[0], params), exact_grads, strict=True):
        assert a.dtype == torch.float32 and a.is_contiguous()
        assert (a.double() - e).norm() <= 1.5 * (b.double() - e).norm() + 1e-3 * e.norm()


def test_input_that_wants_a_gradient_is_refused():
    params = _params(torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient to the input"):
        StandardLossFn.apply(x, *params, 1.0, torch.float64)

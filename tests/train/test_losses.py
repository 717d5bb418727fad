"""Losses and estimators checked against their definitions (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from steer.sae import SAEConfig, build_sae
from train.config import SAETrainSpec
from train.losses import JumpReLUFn, StepFn, build_objective, rectangle, topk_aux_loss


def _sae(arch: str, d_in: int = 6, d_sae: int = 10, k: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, dtype="float64"))
    with torch.no_grad():
        sae.W_dec.mul_(
            torch.rand(d_sae, 1, dtype=torch.float64) + 0.5
        )  # non-unit rows: the L1 weights matter
        sae.b_enc.normal_(0, 0.3)
    return sae


def test_standard_loss_value_and_l1_gradient():
    sae = _sae("standard")
    obj = build_objective(sae, SAETrainSpec(arch="standard", sparsity_coefficient=3.0))
    x = torch.randn(7, 6, dtype=torch.float64)
    out = obj(x, coefficient=3.0, dead_mask=None)

    h = x @ sae.W_enc + sae.b_enc
    f = h.relu()
    norms = sae.W_dec.norm(dim=1)
    mse = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    l1 = 3.0 * (f * norms).sum(-1).mean()
    torch.testing.assert_close(out.mse.double(), mse)
    torch.testing.assert_close(out.penalty.double(), l1)

    # d(penalty)/d b_enc[j] = coeff / B * sum_b ||W_dec[j]|| * 1[h_bj > 0]
    (grad,) = torch.autograd.grad(out.penalty, sae.b_enc)
    expected = 3.0 / x.shape[0] * ((h > 0).double() * norms).sum(0)
    torch.testing.assert_close(grad, expected)
    # d(penalty)/d W_dec[j] = coeff / B * sum_b f_bj * W_dec[j] / ||W_dec[j]||
    (grad_dec,) = torch.autograd.grad(obj(x, 3.0, None).penalty, sae.W_dec)
    expected_dec = 3.0 / x.shape[0] * f.sum(0)[:, None] * sae.W_dec / norms[:, None]
    torch.testing.assert_close(grad_dec, expected_dec.detach())


def test_jumprelu_forward_and_ste_gradients():
    torch.manual_seed(1)
    bw = 0.2
    x = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    theta = torch.full((8,), 0.3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, 8, dtype=torch.float64)
    y = JumpReLUFn.apply(x, theta, bw)
    torch.testing.assert_close(y, x * (x > theta))
    gx, gt = torch.autograd.grad((y * g).sum(), (x, theta))
    torch.testing.assert_close(gx, (x > theta) * g)
    # rectangle-kernel pseudo-derivative: d/dtheta = -(theta/bw) * K((x - theta)/bw)
    in_window = ((x - theta).abs() < bw / 2).double()
    torch.testing.assert_close(gt, (-(theta / bw) * in_window * g).sum(0).detach())

    s = StepFn.apply(x, theta, bw)
    torch.testing.assert_close(s, (x > theta).double())
    gx, gt = torch.autograd.grad((s * g).sum(), (x, theta), allow_unused=True)
    assert gx is None  # the step passes no gradient to its input
    torch.testing.assert_close(gt, (-(1 / bw) * in_window * g).sum(0).detach())


def test_rectangle_kernel_is_open_unit_interval():
    assert rectangle(torch.tensor([-0.5, -0.49, 0.0, 0.49, 0.5])).tolist() == [0, 1, 1, 1, 0]


def test_jumprelu_objective_l0_gradient_through_log_threshold():
    sae = _sae("jumprelu", d_sae=12)
    spec = SAETrainSpec(arch="jumprelu", jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.2)
    obj = build_objective(sae, spec)
    torch.testing.assert_close(obj.log_threshold.exp(), torch.full((12,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(sae.threshold, torch.full((12,), 0.2, dtype=torch.float64))
    x = torch.randn(40, 6, dtype=torch.float64)
    out = obj(x, coefficient=0.7, dead_mask=None)
    h = (x @ sae.W_enc + sae.b_enc).detach()
    theta = obj.log_threshold.exp().detach()
    torch.testing.assert_close(out.penalty.double(), 0.7 * (h > theta).double().sum(-1).mean())
    (g,) = torch.autograd.grad(out.penalty, obj.log_threshold)
    kernel = ((h - theta).abs() < 0.25).double()
    # chain rule through theta = exp(log_theta): d/dlog_theta = theta * d/dtheta
    expected = theta * (0.7 / x.shape[0]) * (-(1 / 0.5) * kernel).sum(0)
    torch.testing.assert_close(g, expected)
    # the inference SAE's activation equals the training forward once the threshold is synced
    torch.testing.assert_close(sae.encode(x), out.feature_acts.detach())


def test_topk_aux_loss_definition_and_zero_without_dead():
    sae = _sae("topk", d_in=6, d_sae=10, k=2)
    obj = build_objective(sae, SAETrainSpec(arch="topk", k=2))
    x = torch.randn(9, 6, dtype=torch.float64)
    none = obj(x, 0.0, dead_mask=torch.zeros(10, dtype=torch.bool))
    assert float(none.penalty) == 0.0
    assert ((none.feature_acts > 0).sum(-1) <= 2).all()

    dead = torch.zeros(10, dtype=torch.bool)
    dead[[1, 4, 7, 8]] = True  # 4 dead, k_aux = d_in // 2 = 3, scale = min(4/3, 1) = 1
    h = x @ sae.W_enc + sae.b_enc
    out_sae = sae.decode(sae.activation(h))
    aux = topk_aux_loss(x, out_sae, h, sae.W_dec, dead)
    acts = torch.zeros_like(h)
    for b in range(9):
        cand = sorted(((h[b, j].item(), j) for j in torch.nonzero(dead).flatten().tolist()), reverse=True)[:3]
        for v, j in cand:
            acts[b, j] = max(v, 0.0)
    expected = ((acts @ sae.W_dec - (x - out_sae)) ** 2).sum(-1).mean()
    torch.testing.assert_close(aux.double(), expected.detach())
    # gradient reaches the dead latents' encoder columns only
    (g,) = torch.autograd.grad(
        topk_aux_loss(x, out_sae.detach(), h, sae.W_dec, dead), sae.b_enc, retain_graph=True
    )
    assert (g[~dead] == 0).all() and (g[dead] != 0).any()

    one_dead = torch.zeros(10, dtype=torch.bool)
    one_dead[3] = True  # scale = 1/3
    aux1 = topk_aux_loss(x, out_sae, h, sae.W_dec, one_dead)
    acts1 = torch.zeros_like(h)
    acts1[:, 3] = h[:, 3].relu()
    expected1 = ((acts1 @ sae.W_dec - (x - out_sae)) ** 2).sum(-1).mean() / 3
    torch.testing.assert_close(aux1.double(), expected1.detach())


def test_objective_rejects_mismatched_architecture():
    with pytest.raises(ValueError, match="does not match"):
        build_objective(_sae("standard"), SAETrainSpec(arch="jumprelu"))


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="needs k"):
        SAETrainSpec(arch="topk")
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SAETrainSpec(arch="gated")
    assert SAETrainSpec(arch="topk", k=32, expansion=8).name == "topk-x8-k32"
    assert math.isclose(SAETrainSpec(arch="standard", sparsity_coefficient=5).sparsity_coefficient, 5)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_fired_features_are_those_with_a_positive_activation(arch: str):
    sae = _sae(arch, k=3 if arch == "topk" else None)
    with torch.no_grad():
        sae.b_enc[:4] = -50.0  # four features that cannot fire on this batch
    obj = build_objective(sae, SAETrainSpec(arch=arch, k=3, jumprelu_init_threshold=0.1))
    res = obj(torch.randn(16, 6, dtype=torch.float64), coefficient=1.0, dead_mask=None)
    fired = res.fired()
    assert torch.equal(fired, (res.feature_acts > 0).any(dim=0))
    assert not fired[:4].any() and fired.any()

"""The standard and JumpReLU SAEs' training losses as autograd functions with hand-derived backwards.

The losses are the ones `train.losses` defines, for the plain training set-up (no input normalisation, no
`b_dec` on the input). Autograd's version of these graphs makes passes over the `[batch, d_sae]`
activations that the maths does not need (a bias broadcast and a separate add for each gradient reaching
the activations; comparisons into bool masks and products with them, each slow on CPU), and, under
bfloat16 autocast, casts of the activations and of their gradients between bfloat16 and float32.

Both share the reconstruction, with `f` the activations and `B` the batch:

    out = f W_dec + b_dec,   mse = mean_t ||out_t - x_t||^2,   g_out = 2 (out - x) / B
    dW_enc = x^T g_h,  db_enc = sum_t g_h,  dW_dec = f^T g_out (+ the penalty's part),  db_dec = sum_t g_out

Standard: `h = x W_enc + b_enc`, `f = relu(h)`, `penalty = c * mean_t sum_j f_tj ||W_dec[j]||`; the
penalty's gradient to `f` is the bias of the one matmul that gives `g_f = g_out W_dec^T + (c/B) ||W_dec||`,
and `g_h = g_f * (f > 0)` is one pass (`threshold_backward`).

JumpReLU (Rajamanoharan et al. 2024): with `theta = exp(log_threshold)`, the encoder matmul gives
`s = h - theta` directly (`b_enc - theta` as its bias), `f = h * (s > 0)`, `penalty = c * mean_t L0_t`, and
the straight-through estimator with the rectangle kernel `K(u) = 1[|u| < 1/2]` of width `bw`:

    d/dtheta_j = -(1/bw) sum_t K(s_tj / bw) (theta_j g_f_tj + c/B),   d/dlog_threshold = theta * d/dtheta

Every mask is applied as `threshold_backward(values, gate, 0)`, values where `gate > 0`, in one pass.

The matmuls and the sums over tokens run in the compute dtype (bfloat16 under the trainer's autocast,
else the SAE's; CPU and CUDA reductions accumulate in float32 either way), the MSE and the penalty in
float32, and the gradients come back in the parameters' dtype.
"""

from __future__ import annotations

from typing import Any

import torch

_where_positive = torch.ops.aten.threshold_backward  # (values, gate, 0): values where gate > 0, else 0


def _check_input(ctx: Any, name: str) -> None:
    if ctx.needs_input_grad[0]:
        raise ValueError(f"{name} gives no gradient to the input activations; detach them")


def _reconstruction_error(
    feature_acts: torch.Tensor, W_dec_c: torch.Tensor, b_dec: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 `out - x` (the decoder in the activations' dtype) and the MSE, as `train.losses.mse_loss`."""
    error = torch.addmm(b_dec.to(feature_acts.dtype), feature_acts, W_dec_c).float() - x.float()
    return error, error.pow(2).sum(dim=-1).mean()


def _output_weights(
    g_loss: torch.Tensor | None,
    g_mse: torch.Tensor | None,
    g_penalty: torch.Tensor | None,
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 gradients reaching the MSE and the penalty (`loss = mse + penalty`; unused: None)."""
    zero = like.new_zeros((), dtype=torch.float32)
    loss = zero if g_loss is None else g_loss.float()
    return loss + (zero if g_mse is None else g_mse.float()), loss + (
        zero if g_penalty is None else g_penalty.float()
    )


def _weight_gradients(
    x_c: torch.Tensor,
    g_hidden: torch.Tensor,
    feature_acts: torch.Tensor,
    g_out: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dW_enc, db_enc, dW_dec, db_dec)` in `dtype` (`dW_dec` without any penalty term)."""
    # (g_h^T x)^T: the faster operand order on CPU; the transposing cast makes it contiguous
    grad_W_enc = torch.mm(g_hidden.T, x_c).T.to(dtype, memory_format=torch.contiguous_format)
    grad_b_enc = g_hidden.sum(dim=0).to(dtype)
    grad_W_dec = torch.mm(feature_acts.T, g_out.to(feature_acts.dtype)).to(dtype)
    return grad_W_enc, grad_b_enc, grad_W_dec, g_out.sum(dim=0).to(dtype)


class StandardLossFn(torch.autograd.Function):
    """`(loss, mse, penalty, feature_acts, activation_sums)` of a standard SAE on `x`; the last two (the
    activations and their float32 sums over tokens) have no gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        coefficient: float,
        compute_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, ...]:
        _check_input(ctx, "StandardLossFn")
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(compute_dtype)
            W_dec_c = W_dec.to(compute_dtype)
            feature_acts = torch.addmm(b_enc.to(compute_dtype), x_c, W_enc.to(compute_dtype)).relu_()
            error, mse = _reconstruction_error(feature_acts, W_dec_c, b_dec, x)
            norms = W_dec.detach().float().norm(dim=1)
            acts_sum = feature_acts.sum(dim=0).float()
            penalty = coefficient * (acts_sum @ norms) / x.shape[0]
        ctx.save_for_backward(x_c, feature_acts, error, W_dec_c, W_dec, norms, acts_sum)
        ctx.coefficient = coefficient
        ctx.mark_non_differentiable(feature_acts, acts_sum)
        ctx.set_materialize_grads(False)
        return mse + penalty, mse, penalty, feature_acts, acts_sum

    @staticmethod
    def backward(ctx: Any, g_loss, g_mse, g_penalty, *_no_grads):
        x_c, feature_acts, error, W_dec_c, W_dec, norms, acts_sum = ctx.saved_tensors
        batch, dtype = x_c.shape[0], W_dec.dtype
        mse_weight, penalty_weight = _output_weights(g_loss, g_mse, g_penalty, error)
        penalty_weight = penalty_weight * (ctx.coefficient / batch)
        with torch.autocast(x_c.device.type, enabled=False):
            g_out = error * (2 * mse_weight / batch)
            g_acts = torch.addmm((penalty_weight * norms).to(x_c.dtype), g_out.to(x_c.dtype), W_dec_c.T)
            g_hidden = _where_positive(g_acts, feature_acts, 0)
            del g_acts
            grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec = _weight_gradients(
                x_c, g_hidden, feature_acts, g_out, dtype
            )
            row_scale = torch.where(norms > 0, penalty_weight * acts_sum / norms, 0.0)
            grad_W_dec.addcmul_(W_dec.detach(), row_scale.to(dtype)[:, None])
        return None, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None


class JumpReLULossFn(torch.autograd.Function):
    """`(loss, mse, penalty, feature_acts, activation_sums)` of a JumpReLU SAE on `x`, the threshold
    `exp(log_threshold)`; the last two have no gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        log_threshold: torch.Tensor,
        coefficient: float,
        bandwidth: float,
        compute_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, ...]:
        _check_input(ctx, "JumpReLULossFn")
        with torch.autocast(x.device.type, enabled=False):
            threshold = log_threshold.detach().exp()
            x_c = x.to(compute_dtype)
            W_dec_c = W_dec.to(compute_dtype)
            above = torch.addmm((b_enc - threshold).to(compute_dtype), x_c, W_enc.to(compute_dtype))
            feature_acts = _where_positive(above + threshold.to(compute_dtype), above, 0)
            error, mse = _reconstruction_error(feature_acts, W_dec_c, b_dec, x)
            acts_sum = feature_acts.sum(dim=0).float()
            # the threshold is positive: the active features are the positive activations, whose signs
            # are 1 (a count per feature, then summed; `count_nonzero` is 10x slower on CPU)
            active = torch.sign(feature_acts).sum(dim=0).float().sum()
            penalty = coefficient * active / x.shape[0]
        ctx.save_for_backward(x_c, feature_acts, above, error, W_dec_c, W_dec, threshold)
        ctx.coefficient, ctx.bandwidth = coefficient, bandwidth
        ctx.mark_non_differentiable(feature_acts, acts_sum)
        ctx.set_materialize_grads(False)
        return mse + penalty, mse, penalty, feature_acts, acts_sum

    @staticmethod
    def backward(ctx: Any, g_loss, g_mse, g_penalty, *_no_grads):
        x_c, feature_acts, above, error, W_dec_c, W_dec, threshold = ctx.saved_tensors
        batch, dtype, bw = x_c.shape[0], W_dec.dtype, ctx.bandwidth
        mse_weight, penalty_weight = _output_weights(g_loss, g_mse, g_penalty, error)
        with torch.autocast(x_c.device.type, enabled=False):
            g_out = error * (2 * mse_weight / batch)
            g_acts = torch.mm(g_out.to(x_c.dtype), W_dec_c.T)
            g_hidden = _where_positive(g_acts, above, 0)
            grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec = _weight_gradients(
                x_c, g_hidden, feature_acts, g_out, dtype
            )
            del g_hidden
            # sum over the kernel's window |s| < bw/2 (as a gate: bw/2 - |s| > 0) of theta g_f + c/B
            window = torch.rsub(above.abs(), bw / 2)
            step_weight = (penalty_weight * (ctx.coefficient / batch)).to(x_c.dtype)
            terms = torch.addcmul(step_weight, g_acts, threshold.to(x_c.dtype))
            del g_acts
            grad_threshold = -_where_positive(terms, window, 0).sum(dim=0).float() / bw
        return (
            None,
            grad_W_enc,
            grad_b_enc,
            grad_W_dec,
            grad_b_dec,
            (grad_threshold * threshold).to(dtype),
            None,
            None,
            None,
        )

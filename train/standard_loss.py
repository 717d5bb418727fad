"""The standard SAE's training loss as one autograd function with a hand-derived backward.

The loss is the one `train.losses.StandardObjective` defines, for the plain training set-up (no input
normalisation, no `b_dec` on the input):

    h = x W_enc + b_enc,   f = relu(h),   out = f W_dec + b_dec
    mse = mean_t ||out_t - x_t||^2,   penalty = c * mean_t sum_j f_tj ||W_dec[j]||

Autograd's version of this graph makes passes over the `[batch, d_sae]` activations that the maths does
not need: a bias broadcast and a separate add for each of the two gradients reaching `f`, and, under
bfloat16 autocast, casts of `f` and of its gradients between bfloat16 and float32. Here:

    g_out = 2 (out - x) / B                                     [batch, d_in], float32
    g_f   = g_out W_dec^T + (c / B) ||W_dec[j]||                one addmm, the penalty as its bias
    g_h   = g_f * (f > 0)                                       one pass
    dW_enc = x^T g_h,   db_enc = sum_t g_h
    dW_dec = f^T g_out + (c / B) (sum_t f_tj) W_dec[j] / ||W_dec[j]||,   db_dec = sum_t g_out

The matmuls and the sums over tokens run in the compute dtype (bfloat16 under the trainer's autocast,
else the SAE's; CPU and CUDA reductions accumulate in float32 either way), the MSE and the penalty in
float32, and the gradients come back in the parameters' dtype. In float32 the gradients equal
autograd's of the same graph; under autocast they differ by bfloat16 rounding, as autograd's do.
"""

from __future__ import annotations

from typing import Any

import torch


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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if ctx.needs_input_grad[0]:
            raise ValueError("StandardLossFn gives no gradient to the input activations; detach them")
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(compute_dtype)
            W_enc_c, W_dec_c = W_enc.to(compute_dtype), W_dec.to(compute_dtype)
            feature_acts = torch.addmm(b_enc.to(compute_dtype), x_c, W_enc_c).relu_()
            out = torch.addmm(b_dec.to(compute_dtype), feature_acts, W_dec_c)
            error = out.float() - x.float()
            mse = error.pow(2).sum(dim=-1).mean()
            norms = W_dec.detach().float().norm(dim=1)
            acts_sum = feature_acts.sum(dim=0).float()
            penalty = coefficient * (acts_sum @ norms) / x.shape[0]
        ctx.save_for_backward(x_c, feature_acts, error, W_dec_c, W_dec, norms, acts_sum)
        ctx.coefficient = coefficient
        ctx.mark_non_differentiable(feature_acts, acts_sum)
        ctx.set_materialize_grads(False)
        return mse + penalty, mse, penalty, feature_acts, acts_sum

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor | None, g_mse: torch.Tensor | None, g_penalty, *_no_grads):
        x_c, feature_acts, error, W_dec_c, W_dec, norms, acts_sum = ctx.saved_tensors
        batch, dtype = x_c.shape[0], W_dec.dtype
        zero = error.new_zeros(())
        g_loss = zero if g_loss is None else g_loss.float()
        mse_weight = g_loss + (zero if g_mse is None else g_mse.float())
        penalty_weight = (g_loss + (zero if g_penalty is None else g_penalty.float())) * (
            ctx.coefficient / batch
        )
        with torch.autocast(x_c.device.type, enabled=False):
            g_out = error * (2 * mse_weight / batch)
            g_out_c = g_out.to(x_c.dtype)
            g_acts = torch.addmm((penalty_weight * norms).to(x_c.dtype), g_out_c, W_dec_c.T)
            g_hidden = torch.ops.aten.threshold_backward(g_acts, feature_acts, 0)
            del g_acts
            grad_W_enc = torch.mm(g_hidden.T, x_c).T.to(dtype, memory_format=torch.contiguous_format)
            grad_b_enc = g_hidden.sum(dim=0).to(dtype)
            del g_hidden
            grad_W_dec = torch.mm(feature_acts.T, g_out_c).to(dtype)
            row_scale = torch.where(norms > 0, penalty_weight * acts_sum / norms, 0.0)
            grad_W_dec.addcmul_(W_dec.detach(), row_scale.to(dtype)[:, None])
            grad_b_dec = g_out.sum(dim=0).to(dtype)
        return None, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None

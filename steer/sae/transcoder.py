"""Single-layer transcoders: encode the MLP's input, decode towards the MLP's output (SAELens names and layouts).

- `transcoder` (ReLU) and `jumprelu_transcoder`: `out = f @ W_dec + b_dec`, `f = act(x @ W_enc + b_enc)`;
- `skip_transcoder` and `jumprelu_skip_transcoder` (Gemma Scope 2's `_affine` ones) add an affine skip
  connection: `out += x @ A`, stored as SAELens does, `W_skip = A^T [d_out, d_in]`, so `out += x @ W_skip^T`.

Steering never reconstructs the MLP output: an edit adds `(f' - f) @ W_dec` to the real MLP output, so the
transcoder's error (the real output minus its reconstruction) is kept exactly as for SAEs. `b_dec` and the skip
term do not depend on the edited features and cancel in that difference; they matter only for `forward` (the
reconstruction, e.g. for metrics).
"""

from __future__ import annotations

import torch
from torch import nn

from steer.errors import ConfigError
from steer.sae.base import SAE, SAEConfig, register
from steer.sae.jumprelu import JumpReLUSAE
from steer.sae.standard import StandardSAE


class TranscoderMixin(SAE):
    """What every transcoder adds to its activation's SAE class: `d_out`, and the skip connection if `skip`."""

    transcoder = True

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.apply_b_dec_to_input or cfg.normalize_activations != "none":
            raise ConfigError(
                f"a {self.architecture} reads its input as is: apply_b_dec_to_input must be false and "
                f"normalize_activations 'none', got {cfg.apply_b_dec_to_input} and {cfg.normalize_activations!r}"
            )
        super().__init__(cfg)
        if self.skip:
            self.W_skip = nn.Parameter(
                torch.zeros(self.d_out, self.d_in, dtype=self.dtype, device=self.device)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstructed MLP output `[..., d_out]` of MLP inputs `x [..., d_in]` (skip term included)."""
        out = self.decode(self.encode(x))
        if self.skip:
            out = out + x.to(self.dtype) @ self.W_skip.T
        return out


@register
class ReLUTranscoder(TranscoderMixin, StandardSAE):
    architecture = "transcoder"


@register
class SkipTranscoder(ReLUTranscoder):
    architecture = "skip_transcoder"
    skip = True


@register
class JumpReLUTranscoder(TranscoderMixin, JumpReLUSAE):
    architecture = "jumprelu_transcoder"


@register
class JumpReLUSkipTranscoder(JumpReLUTranscoder):
    architecture = "jumprelu_skip_transcoder"
    skip = True

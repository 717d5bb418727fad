"""JumpReLU SAE: a feature fires only above its learned per-feature `threshold`."""

import torch
from torch import nn

from steer.sae.base import ElementwiseSAE, SAEConfig, register


@register
class JumpReLUSAE(ElementwiseSAE):
    architecture = "jumprelu"
    sparsity = "l0"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype, device=self.device))

    def feature_activation(self, hidden_pre: torch.Tensor, features: torch.Tensor | slice) -> torch.Tensor:
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold[features])

"""Standard ReLU SAE (trained with an L1 penalty)."""

import torch

from steer.sae.base import ElementwiseSAE, register


@register
class StandardSAE(ElementwiseSAE):
    architecture = "standard"
    sparsity = "l1"

    def feature_activation(self, hidden_pre: torch.Tensor, features: torch.Tensor | slice) -> torch.Tensor:
        return torch.relu(hidden_pre)

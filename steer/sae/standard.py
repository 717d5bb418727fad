"""Standard ReLU SAE (trained with an L1 penalty)."""

import torch

from steer.sae.base import SAE, register


@register
class StandardSAE(SAE):
    architecture = "standard"

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(hidden_pre)

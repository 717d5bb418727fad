"""TopK SAE: keep the `k` largest pre-activations per token (ReLU'd), zero the rest."""

from collections.abc import Callable, Sequence

import torch

from steer.errors import ConfigError
from steer.sae.base import SAE, SAEConfig, register


@register
class TopKSAE(SAE):
    architecture = "topk"
    sparsity = "k"

    def __init__(self, cfg: SAEConfig) -> None:
        if not cfg.k or not 0 < cfg.k <= cfg.d_sae:
            raise ConfigError(f"topk SAE needs 0 < k <= d_sae={cfg.d_sae}, got k={cfg.k}")
        super().__init__(cfg)

    @property
    def k(self) -> int:
        return self.cfg.k

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        values, indices = hidden_pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())

    def feature_encoder(self, features: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """All pre-activations (the k-th largest is the threshold), but no dense latent tensor."""
        idx = torch.tensor(list(features), device=self.device)

        def encode(x: torch.Tensor) -> torch.Tensor:
            h = torch.addmm(self.b_enc, self.encoder_input(x), self.W_enc)
            kth = h.topk(self.k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
            h = h[:, idx]
            return torch.relu(h) * (h >= kth)

        return encode

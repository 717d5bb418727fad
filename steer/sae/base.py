"""The SAE module shared by every architecture: config, weights, normalisation, encode/decode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from steer.errors import ConfigError
from steer.sites import UnplaceableHook, trained_site

NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE; mirrors SAELens v6 `cfg.json` top-level keys."""

    architecture: str
    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    k: int | None = None
    norm_scaling_factor: float | None = None
    d_out: int | None = None  # transcoders: the width they write (None: an SAE, which writes d_in)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ConfigError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.d_out is not None and self.d_out <= 0:
            raise ConfigError(f"d_out (a transcoder's output width) must be positive, got {self.d_out}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize_activations={self.normalize_activations!r} is not supported; "
                f"expected one of {', '.join(NORMALIZATIONS)}"
            )
        if self.normalize_activations == "expected_average_only_in" and not self.norm_scaling_factor:
            raise ConfigError(
                "normalize_activations='expected_average_only_in' needs a stored norm_scaling_factor "
                "(a positive float in cfg.json)"
            )
        if self.reshape_activations != "none":
            raise ConfigError(
                f"reshape_activations={self.reshape_activations!r} is not supported; "
                "fast-steer SAEs read the residual stream ('none')"
            )

    def to_dict(self) -> dict[str, Any]:
        """The SAELens v6 `cfg.json` dict (optional keys left out when unset)."""
        out = asdict(self)
        for key in ("k", "norm_scaling_factor", "d_out"):
            if out[key] is None:
                del out[key]
        return out


class SAE(nn.Module):
    """A sparse autoencoder `x -> f = act(W_enc^T (x - b_dec?) + b_enc) -> f W_dec + b_dec`.

    Subclasses (one module per architecture, registered by name) define `activation`.
    `encode` remembers the normalisation statistics of its input so that the following
    `decode` undoes them, as SAELens does. A transcoder (`steer.sae.transcoder`) is an SAE whose decoder
    writes another site (`d_out` wide) than its encoder reads.
    """

    architecture: ClassVar[str]
    sparsity: ClassVar[
        str
    ]  # what sets its sparsity in training: "l1" / "l0" coefficient, or "k" (no coefficient)
    transcoder: ClassVar[bool] = (
        False  # reads the MLP input, writes the MLP output (not trained by fast-steer)
    )
    skip: ClassVar[bool] = False  # a transcoder with an affine skip connection `W_skip`

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = dtype_from_name(cfg.dtype)
        device = torch.device(cfg.device)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        d_out = cfg.d_out or cfg.d_in
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, d_out, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        self._norm_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.source: str | dict[str, str] | None = None  # where it was loaded from: a spec's SAE reference
        self.labels: Any = None  # the default labelling its folder carried (`hub.labels.Labelling`), if any
        self.reset_parameters()

    # -- attributes -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """The width of what the decoder writes: `d_in` for an SAE, the output site's for a transcoder."""
        return self.cfg.d_out or self.cfg.d_in

    @property
    def metadata(self) -> dict[str, Any]:
        return self.cfg.metadata

    @property
    def layer(self) -> int | None:
        """The decoder block whose output this SAE was trained on (from its metadata), if known."""
        return sae_layer(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        return f"architecture={self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.dtype}"

    # -- initialisation ---------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Kaiming-uniform decoder rows scaled to unit norm, encoder = decoder transpose, zero biases."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.W_dec)
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            if self.d_out == self.d_in:
                self.W_enc.copy_(self.W_dec.T)
            else:
                nn.init.kaiming_uniform_(self.W_enc)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors a saved SAE of this config must contain."""
        return {name: tuple(p.shape) for name, p in self.state_dict().items()}

    # -- normalisation ----------------------------------------------------------------------
    def normalize_in(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the configured input normalisation and remember what `decode` must undo."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            self._norm_state = (coeff, torch.zeros_like(coeff))
            return x * coeff
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)
            self._norm_state = (1.0 / (std + 1e-5), mu)
            return centred / (std + 1e-5)
        if mode == "expected_average_only_in":
            return x * self.cfg.norm_scaling_factor
        return x

    def normalize_out(self, y: torch.Tensor) -> torch.Tensor:
        """Undo the input normalisation on a reconstruction."""
        mode = self.cfg.normalize_activations
        if mode in ("constant_norm_rescale", "layer_norm"):
            if self._norm_state is None:
                raise RuntimeError(f"decode() with normalize_activations={mode!r} must follow encode()")
            scale, shift = self._norm_state
            return y / scale + shift
        if mode == "expected_average_only_in":
            return y / self.cfg.norm_scaling_factor
        return y

    # -- the maths --------------------------------------------------------------------------
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the encoder reads it: normalised (remembered for `decode`), minus `b_dec` if configured."""
        x = self.normalize_in(x.to(self.dtype))
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations `W_enc^T x' + b_enc` after normalisation (and `b_dec` if configured)."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def feature_encoder(self, features: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function giving only `features`' activations `[N, k]` of residuals `[N, d_in]`.

        The default runs the full encoder; architectures that can do with less override it.
        """
        idx = torch.tensor(list(features), device=self.device)
        return lambda x: self.encode(x)[:, idx]

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """The architecture's non-linearity."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations `[..., d_sae]` of residuals `[..., d_in]`."""
        return self.activation(self.hidden_pre(x))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction `[..., d_in]` of feature activations `[..., d_sae]`."""
        return self.normalize_out(feature_acts.to(self.dtype) @ self.W_dec + self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class ElementwiseSAE(SAE):
    """An SAE whose activation acts on each feature alone, so a few features need only their columns."""

    def feature_activation(self, hidden_pre: torch.Tensor, features: torch.Tensor | slice) -> torch.Tensor:
        """The activation of pre-activations `[..., k]` of `features` (a slice: all of them)."""
        raise NotImplementedError

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return self.feature_activation(hidden_pre, slice(None))

    def feature_encoder(self, features: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        idx = torch.tensor(list(features), device=self.device)
        with torch.no_grad():
            W_enc = self.W_enc[:, idx].detach().contiguous()
            b_enc = self.b_enc[idx].detach()
        return lambda x: self.feature_activation(torch.addmm(b_enc, self.encoder_input(x), W_enc), idx)


def sae_layer(sae: SAE | dict[str, Any]) -> int | None:
    """The layer whose residual stream (output of decoder block L) an SAE reads, from its metadata in any
    supported format: `blocks.L.hook_resid_post` -> L, `blocks.L.hook_resid_pre` -> L-1, sparsify's `layers.L`
    -> L. None for other sites (an MLP or attention output, a transcoder: see `steer.sites`) or no hook at all.
    """
    meta = sae.metadata if isinstance(sae, SAE) else sae
    transcoder = isinstance(sae, SAE) and sae.transcoder
    try:
        kind, layer = trained_site(meta, transcoder=transcoder)
    except UnplaceableHook:
        return None
    return layer if kind == "resid_post" else None


_REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    """Class decorator adding an architecture to the name registry."""
    _REGISTRY[cls.architecture] = cls
    return cls


def architectures() -> tuple[str, ...]:
    """The SAE architectures fast-steer trains (transcoders are only loaded: see `sae_class`)."""
    return tuple(sorted(name for name, cls in _REGISTRY.items() if not cls.transcoder))


def sae_class(architecture: str) -> type[SAE]:
    """The class of any registered architecture, transcoders included."""
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ConfigError(
            f"unknown SAE architecture {architecture!r}; expected one of {', '.join(sorted(_REGISTRY))}"
        ) from None


def build_sae(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE of the architecture named in `cfg`."""
    return sae_class(cfg.architecture)(cfg)


_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"`, `"torch.bfloat16"` or a dtype -> torch dtype, with a clear error."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unsupported dtype {name!r}; expected one of float32, bfloat16, float16, float64")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

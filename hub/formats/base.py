"""What every on-disk SAE format describes: the config it maps to and how its tensors become SAE parameters."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hub.validate import SAEFormatError
from steer.sae import SAEConfig, dtype_from_name, dtype_name, sae_class

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a weights file: its name and shape there, and the SAE parameter it becomes."""

    key: str
    shape: tuple[int, ...]
    target: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class FolderLayout:
    """A parsed SAE folder: the SAE config plus where each parameter comes from.

    `fold` runs once all tensors are loaded (already in the target dtype) and rewrites them in place
    into exactly the parameters of our SAE (e.g. SAELens 5 `scaling_factor` folded into `W_dec`).
    `file_dtype` is the dtype the config promises for the stored tensors (None: not declared).
    """

    format: str
    cfg: SAEConfig
    weights_file: str
    tensors: list[FileTensor]
    file_dtype: str | None
    fold: Callable[[Tensors], None] | None = None


def transpose(t: torch.Tensor) -> torch.Tensor:
    return t.T.contiguous()


def standard_tensors(cfg: SAEConfig) -> list[FileTensor]:
    """The SAELens tensors of `cfg`: W_enc, b_enc, W_dec, b_dec (+ threshold for the jumprelu architectures,
    + W_skip [d_out, d_in] for skip transcoders)."""
    d_out = cfg.d_out or cfg.d_in
    tensors = [
        FileTensor("W_enc", (cfg.d_in, cfg.d_sae), "W_enc"),
        FileTensor("b_enc", (cfg.d_sae,), "b_enc"),
        FileTensor("W_dec", (cfg.d_sae, d_out), "W_dec"),
        FileTensor("b_dec", (d_out,), "b_dec"),
    ]
    if cfg.architecture.startswith("jumprelu"):
        tensors.append(FileTensor("threshold", (cfg.d_sae,), "threshold"))
    if sae_class(cfg.architecture).skip:
        tensors.append(FileTensor("W_skip", (d_out, cfg.d_in), "W_skip"))
    return tensors


def check_architecture(architecture: Any, where: str) -> str:
    try:
        sae_class(str(architecture))
    except ValueError as exc:
        raise SAEFormatError(f"{where}: {exc}") from None
    return str(architecture)


def canonical_dtype(name: Any, where: str) -> str:
    """`"torch.float32"` -> `"float32"`, with a format error for anything that is not a float dtype."""
    try:
        return dtype_name(dtype_from_name(str(name)))
    except ValueError as exc:
        raise SAEFormatError(f"{where}: {exc}") from None


def positive_int(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEFormatError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def topk_k(value: Any, d_sae: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= d_sae:
        raise SAEFormatError(
            f"{where}: a topk SAE needs an integer k with 0 < k <= d_sae={d_sae}, got {value!r}"
        )
    return value


def build_config(where: str, **fields: Any) -> SAEConfig:
    """An `SAEConfig`, turning its own validation errors into format errors that name the folder."""
    try:
        return SAEConfig(**fields)
    except ValueError as exc:
        raise SAEFormatError(f"{where}: {exc}") from None


def fold_decoder_norm(tensors: Tensors) -> None:
    """Fold decoder row norms into the encoder (SAELens `rescale_acts_by_decoder_norm`): exact."""
    norms = tensors["W_dec"].norm(dim=-1).clamp_min(1e-8)
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    tensors["W_enc"] = tensors["W_enc"] * norms
    tensors["b_enc"] = tensors["b_enc"] * norms


def hook_metadata_from_module_name(name: str) -> dict[str, Any]:
    """Hook keys for a folder named after a transformers module (`layers.12`, `model.layers.12`)."""
    match = re.fullmatch(r"(?:model\.)?layers[._](\d+)", name)
    if match is None:
        return {"hf_hook_name": name}
    layer = int(match.group(1))
    return {"hook_name": f"blocks.{layer}.hook_resid_post", "hook_layer": layer, "hf_hook_name": name}

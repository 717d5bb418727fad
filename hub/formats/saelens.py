"""SAELens folders: `cfg.json` + `sae_weights.safetensors`, in the v6 layout (nested `metadata`) or the
flat v5 layout (`hook_name`, `hook_layer`, `activation_fn_str`...), which the FAST paper's releases use."""

from __future__ import annotations

import warnings
from typing import Any

from hub.formats.base import (
    FileTensor,
    FolderLayout,
    Tensors,
    build_config,
    canonical_dtype,
    check_architecture,
    fold_decoder_norm,
    positive_int,
    standard_tensors,
    topk_k,
)
from hub.validate import SAEFormatError
from steer.sae import SAEConfig, sae_class

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
# The SAELens config version our cfg.json files follow; SAELens reads anything older as a v5 config.
FORMAT_VERSION = "6.0.0"

# v5 keys that define the maths; everything else in a flat v5 config is provenance and goes to metadata.
_V5_STRUCTURAL = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "activation_fn_str",
    "activation_fn",
    "activation_fn_kwargs",
    "finetuning_scaling_factor",
    "reshape_activations",
    "hook_point",
    "norm_scaling_factor",
    "k",
}


def _version_tuple(version: Any) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def is_v6(cfg: dict[str, Any]) -> bool:
    """SAELens' own rule (a recorded `sae_lens_version` >= 6), plus: a nested `metadata` object and no
    flat `hook_name` means v6 even when no version is recorded."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else None
    version = cfg.get("sae_lens_version") or (metadata or {}).get("sae_lens_version")
    if version:
        return _version_tuple(version) >= (6,)
    return metadata is not None and "hook_name" not in cfg


def _normalization(value: Any, factor: Any, where: str) -> str:
    """SAELens semantics: a bool means none / expected_average_only_in; `expected_average_only_in`
    without a stored scale is the identity at inference (the scale lived in SAELens' release list)."""
    if value is None or value is False:
        return "none"
    if value is True:
        value = "expected_average_only_in"
    if value == "expected_average_only_in" and not factor:
        warnings.warn(
            f"{where}: normalize_activations='expected_average_only_in' but no norm_scaling_factor is stored; "
            "inputs are used unscaled, as SAELens does for such folders",
            stacklevel=4,
        )
        return "none"
    return str(value)


def _sae_config(
    cfg: dict[str, Any], where: str, shape: tuple[str, int, int, str, str], **fields: Any
) -> SAEConfig:
    """`build_config` from what a version has read its own way (`shape`: architecture, d_in, d_sae, dtype,
    normalisation; and `fields`), plus the keys SAELens v5 and v6 spell alike (device, b_dec on the input,
    the stored normalisation scale) read from `cfg` here, once."""
    architecture, d_in, d_sae, dtype, normalize = shape
    return build_config(
        where,
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype,
        device=str(cfg.get("device", "cpu")),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        norm_scaling_factor=cfg.get("norm_scaling_factor")
        if normalize == "expected_average_only_in"
        else None,
        **fields,
    )


def parse_v6(cfg: dict[str, Any], where: str) -> FolderLayout:
    for key in ("architecture", "d_in", "d_sae"):
        if cfg.get(key) is None:
            raise SAEFormatError(f"{where}: cfg.json lacks required key {key}")
    architecture = check_architecture(cfg["architecture"], where)
    d_in, d_sae = positive_int(cfg, "d_in", where), positive_int(cfg, "d_sae", where)
    dtype = canonical_dtype(cfg.get("dtype", "float32"), where)
    metadata = dict(cfg.get("metadata") or {})
    normalize = _normalization(cfg.get("normalize_activations"), cfg.get("norm_scaling_factor"), where)
    sae_cfg = _sae_config(
        cfg,
        where,
        (architecture, d_in, d_sae, dtype, normalize),
        reshape_activations=str(cfg.get("reshape_activations", "none")),
        k=topk_k(cfg.get("k"), d_sae, where) if architecture == "topk" else None,
        d_out=positive_int(cfg, "d_out", where) if sae_class(architecture).transcoder else None,
        metadata=metadata,
    )
    fold = fold_decoder_norm if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm") else None
    return FolderLayout("saelens-v6", sae_cfg, WEIGHTS_FILE, standard_tensors(sae_cfg), dtype, fold)


def _fold_finetuning_scaling(tensors: Tensors) -> None:
    """SAELens 5 decodes `(f * scaling_factor) @ W_dec`: the same as `f @ (scaling_factor[:, None] * W_dec)`."""
    scale = tensors.pop("scaling_factor")
    tensors["W_dec"] = tensors["W_dec"] * scale[:, None]


def parse_v5(cfg: dict[str, Any], where: str) -> FolderLayout:
    for key in ("d_in", "d_sae"):
        if cfg.get(key) is None:
            raise SAEFormatError(f"{where}: cfg.json lacks required key {key}")
    d_in, d_sae = positive_int(cfg, "d_in", where), positive_int(cfg, "d_sae", where)
    architecture = check_architecture(cfg.get("architecture", "standard"), where)
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = None
    if activation == "topk":
        architecture, k = "topk", topk_k(kwargs.get("k"), d_sae, where)
    elif architecture == "topk":
        k = topk_k(cfg.get("k", kwargs.get("k")), d_sae, where)
    elif activation != "relu":
        raise SAEFormatError(
            f"{where}: activation function {activation!r} is not supported; expected 'relu' or 'topk'"
        )
    dtype = canonical_dtype(cfg.get("dtype", "float32"), where)
    normalize = _normalization(cfg.get("normalize_activations"), cfg.get("norm_scaling_factor"), where)
    metadata = {key: value for key, value in cfg.items() if key not in _V5_STRUCTURAL}
    if "hook_point" in cfg and "hook_name" not in metadata:
        metadata["hook_name"] = cfg["hook_point"]
    hook_name = str(metadata.get("hook_name", ""))
    sae_cfg = _sae_config(
        cfg,
        where,
        (architecture, d_in, d_sae, dtype, normalize),
        reshape_activations=str(
            cfg.get("reshape_activations", "hook_z" if "hook_z" in hook_name else "none")
        ),
        k=k,
        metadata=metadata,
    )
    tensors = standard_tensors(sae_cfg)
    fold = None
    if cfg.get("finetuning_scaling_factor"):
        tensors.append(FileTensor("scaling_factor", (d_sae,), "scaling_factor"))
        fold = _fold_finetuning_scaling
    return FolderLayout("saelens-v5", sae_cfg, WEIGHTS_FILE, tensors, dtype, fold)


def parse(cfg: dict[str, Any], where: str) -> FolderLayout:
    return parse_v6(cfg, where) if is_v6(cfg) else parse_v5(cfg, where)


def v6_config(cfg: SAEConfig) -> dict[str, Any]:
    """The cfg.json we write: SAELens v6 top-level keys, and a metadata version SAELens reads as v6."""
    out = cfg.to_dict()
    metadata = dict(out["metadata"])
    if _version_tuple(metadata.get("sae_lens_version", "0")) < (6,):
        metadata["sae_lens_version"] = FORMAT_VERSION
    out["metadata"] = metadata
    return out

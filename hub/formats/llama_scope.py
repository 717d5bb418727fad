"""Llama Scope (fnlp, Llama-3.1-8B base) and Llama-Scope-R1-Distill folders, read as SAELens 6.54.12 does.

- Llama Scope: `hyperparams.json` + `checkpoints/final.safetensors`, a scalar `jump_relu_threshold` and
  `dataset_average_activation_norm.in`; inputs are scaled by `s = sqrt(d_model) / norm.in`, and SAELens
  multiplies the threshold by `s` too (kept for parity; see the research notes, not confirmed upstream).
- R1-Distill: `config.json` + `sae_weights.safetensors` with a per-feature `log_jumprelu_threshold`
  (threshold = exp, not multiplied by `s`); `s` is not in the folder, only in SAELens's release list, so it
  comes from the registry (or the folder's own `dataset_average_activation_norm` when present).

Both store `nn.Linear` layouts: `encoder.weight [F, D]`, `decoder.weight [D, F]` (transposed here).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from hub.formats.base import FileTensor, FolderLayout, Tensors, build_config, positive_int, transpose
from hub.validate import SAEFormatError, read_json
from steer.sae import SAEConfig

V1_CONFIG_FILE = "hyperparams.json"
V1_WEIGHTS_FILE = "checkpoints/final.safetensors"
R1_CONFIG_FILE = "config.json"
R1_WEIGHTS_FILE = "sae_weights.safetensors"
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_post|attn_out|mlp_out)")
_HF_MODULES = {
    "resid_post": ("model.layers.{L}", "output"),
    "attn_out": ("model.layers.{L}.self_attn", "output"),
    "mlp_out": ("model.layers.{L}.mlp", "output"),
}


def hook_metadata(hook: Any, where: str) -> dict[str, Any]:
    match = _HOOK.fullmatch(str(hook))
    if match is None:
        raise SAEFormatError(
            f"{where}: hook_point_in {hook!r} is not a Llama Scope site; expected blocks.<L>.hook_resid_post, "
            "hook_attn_out or hook_mlp_out"
        )
    layer, site = int(match.group(1)), match.group(2)
    module, side = _HF_MODULES[site]
    return {
        "hook_name": str(hook),
        "hook_layer": layer,
        "hf_hook_name": module.format(L=layer),
        "hf_hook_side": side,
    }


def _norm_factor(raw: dict[str, Any], d_in: int, where: str) -> float | None:
    norms = raw.get("dataset_average_activation_norm")
    if not isinstance(norms, dict) or norms.get("in") is None:
        return None
    value = norms["in"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise SAEFormatError(
            f"{where}: dataset_average_activation_norm.in must be a positive number, got {value!r}"
        )
    return math.sqrt(d_in) / value


def _linear_tensors(d_in: int, d_sae: int) -> list[FileTensor]:
    return [
        FileTensor("encoder.weight", (d_sae, d_in), "W_enc", transpose),
        FileTensor("encoder.bias", (d_sae,), "b_enc"),
        FileTensor("decoder.weight", (d_in, d_sae), "W_dec", transpose),
        FileTensor("decoder.bias", (d_in,), "b_dec"),
    ]


def _config(where: str, raw: dict[str, Any], model: str, d_in: int, d_sae: int, scale: float) -> SAEConfig:
    """The JumpReLU config both Llama Scope layouts share: no b_dec on the input, inputs scaled by `scale`."""
    return build_config(
        where,
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=False,
        normalize_activations="expected_average_only_in",
        norm_scaling_factor=scale,
        metadata={"model_name": model, **hook_metadata(raw.get("hook_point_in"), where)},
    )


def parse_v1(folder: Path, hints: dict[str, Any]) -> FolderLayout:
    where = str(folder / V1_CONFIG_FILE)
    raw = read_json(folder / V1_CONFIG_FILE)
    d_in, d_sae = positive_int(raw, "d_model", where), positive_int(raw, "d_sae", where)
    threshold = raw.get("jump_relu_threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise SAEFormatError(f"{where}: jump_relu_threshold must be a number, got {threshold!r}")
    scale = _norm_factor(raw, d_in, where)
    if scale is None:
        raise SAEFormatError(f"{where}: lacks dataset_average_activation_norm.in (the input norm scale)")
    cfg = _config(where, raw, "meta-llama/Llama-3.1-8B", d_in, d_sae, scale)

    def fold(loaded: Tensors) -> None:  # SAELens: a scalar threshold, multiplied by the norm scale
        loaded["threshold"] = torch.full_like(loaded["b_enc"], float(threshold) * scale)

    return FolderLayout("llama-scope", cfg, V1_WEIGHTS_FILE, _linear_tensors(d_in, d_sae), None, fold)


def parse_r1(folder: Path, hints: dict[str, Any]) -> FolderLayout:
    where = str(folder / R1_CONFIG_FILE)
    raw = read_json(folder / R1_CONFIG_FILE)
    d_in = positive_int(raw, "d_model", where)
    d_sae = d_in * positive_int(raw, "expansion_factor", where)
    scale = _norm_factor(raw, d_in, where) or hints.get("norm_scaling_factor")
    if not scale:
        raise SAEFormatError(
            f"{folder}: a Llama-Scope-R1-Distill SAE needs its input norm scale, which is not in {R1_CONFIG_FILE}; "
            "load it by its release id (fast-steer's registry has it), e.g. "
            "llama_scope_r1_distill:l15r_800m_slimpajama"
        )
    cfg = _config(where, raw, "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", d_in, d_sae, float(scale))
    tensors = [
        *_linear_tensors(d_in, d_sae),
        FileTensor("log_jumprelu_threshold", (d_sae,), "threshold", torch.exp),
    ]
    return FolderLayout("llama-scope-r1", cfg, R1_WEIGHTS_FILE, tensors, None)

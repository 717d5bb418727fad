"""Synthetic fixtures of public SAE release formats, with the exact file names, tensor names and layouts of
the real ones (../shared/research/sae_formats.md §5) but small widths. Each writer returns the files as
`{path inside the Hub repo: bytes}` (for a fake Hugging Face cache) after writing them under `root`."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

D_IN = 8


def _rand(seed: int, *shape: int, scale: float = 0.4) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _write(root: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def jumprelu_arrays(d_in: int, d_sae: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """SAELens-oriented JumpReLU weights whose thresholds leave a fair share of features active."""
    return {
        "W_enc": _rand(seed, d_in, d_sae),
        "W_dec": _rand(seed + 1, d_sae, d_in),
        "b_enc": _rand(seed + 2, d_sae, scale=0.1),
        "b_dec": _rand(seed + 3, d_in, scale=0.1),
        "threshold": _rand(seed + 4, d_sae, scale=0.3).abs(),
    }


def gemma_scope_1(
    root: Path, path: str, *, d_sae: int = 4096, lower: bool = False, seed: int = 0
) -> dict[str, bytes]:
    """`{path}/params.npz` (float32): W_enc, W_dec, b_enc, b_dec, threshold (`w_enc`/`w_dec` with `lower`)."""
    arrays = {k: v.numpy() for k, v in jumprelu_arrays(D_IN, d_sae, seed).items()}
    if lower:
        arrays["w_enc"], arrays["w_dec"] = arrays.pop("W_enc"), arrays.pop("W_dec")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return _write(root, {f"{path}/params.npz": buf.getvalue()})


def gemma_scope_2(
    root: Path,
    path: str,
    *,
    d_sae: int = 64,
    config: dict | None = None,
    seed: int = 0,
    drop: str | None = None,
) -> dict[str, bytes]:
    """`{path}/params.safetensors` (w_enc, w_dec, b_enc, b_dec, threshold) + `config.json` (None: none)."""
    tensors = {
        k.lower() if k.startswith("W_") else k: v for k, v in jumprelu_arrays(D_IN, d_sae, seed).items()
    }
    if drop:
        tensors.pop(drop)
    files = {f"{path}/params.safetensors": save_safetensors(tensors)}
    if config is not None:
        files[f"{path}/config.json"] = json.dumps(config).encode()
    return _write(root, files)


def gs2_config(
    layer: int, site: str, width: int = 64, model: str = "google/gemma-3-1b-it", affine: bool = False
) -> dict:
    """`site` is a Gemma Scope 2 SAE kind, or `transcoder` (pre- to post-feedforward layernorm)."""
    hooks = {
        "resid_post": f"model.layers.{layer}.output",
        "attn_out": f"model.layers.{layer}.self_attn.o_proj.input",
        "mlp_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
        "transcoder": f"model.layers.{layer}.pre_feedforward_layernorm.output",
    }
    return {
        "width": width,
        "model_name": model,
        "architecture": "jump_relu",
        "l0": 60,
        "affine_connection": affine,
        "type": "transcoder" if site == "transcoder" else "sae",
        "hf_hook_point_in": hooks[site],
        "hf_hook_point_out": hooks["mlp_out" if site == "transcoder" else site],
    }


def gemma_scope_2_transcoder(
    root: Path, path: str, *, affine: bool, d_sae: int = 64, config: dict | None = None, seed: int = 0
) -> dict[str, bytes]:
    """`{path}/params.safetensors` of a transcoder (+ `affine_skip_connection [D, D]` when `affine`)."""
    files = gemma_scope_2(root, path, d_sae=d_sae, config=config, seed=seed)
    if affine:
        tensors = load_safetensors(files[f"{path}/params.safetensors"])
        tensors["affine_skip_connection"] = _rand(seed + 20, D_IN, D_IN)
        files[f"{path}/params.safetensors"] = save_safetensors(tensors)
    return _write(root, files)


def mwhanna_transcoder(
    root: Path, layer: int, *, d_sae: int = 64, seed: int = 0, skip: bool = False, typo: bool = False
) -> dict[str, bytes]:
    """`layer_{L}.safetensors` (circuit-tracer layout: `W_enc [F, D]`, `W_dec [F, D]`, `b_enc`, `b_dec`
    [, `W_skip [D, D]`]) + `wandb-config.yaml` (`wanb-config.yaml` with `typo`) + `config.yaml`, at the root."""
    w = jumprelu_arrays(D_IN, d_sae, seed)
    tensors = {
        "W_enc": w["W_enc"].T.contiguous(),
        "W_dec": w["W_dec"],
        "b_enc": w["b_enc"],
        "b_dec": w["b_dec"],
    }
    if skip:
        tensors["W_skip"] = _rand(seed + 20, D_IN, D_IN)
    wandb = f"d_model:\n  desc: null\n  value: {D_IN}\nd_feature:\n  desc: null\n  value: {d_sae}\n"
    wandb += "batch_size:\n  value: 1024\n"
    config = "model_name: Qwen/Qwen3-4B\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n"
    return _write(
        root,
        {
            f"layer_{layer}.safetensors": save_safetensors(tensors),
            "wanb-config.yaml" if typo else "wandb-config.yaml": wandb.encode(),
            "config.yaml": config.encode(),
        },
    )


def _linear(d_in: int, d_sae: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    w = jumprelu_arrays(d_in, d_sae, seed)
    return {
        "encoder.weight": w["W_enc"].T.contiguous().to(dtype),
        "encoder.bias": w["b_enc"].to(dtype),
        "decoder.weight": w["W_dec"].T.contiguous().to(dtype),
        "decoder.bias": w["b_dec"].to(dtype),
    }


def llama_scope(
    root: Path,
    path: str,
    layer: int,
    *,
    norm_scaling_factor: float,
    d_sae: int = 64,
    seed: int = 0,
    site: str = "resid_post",
) -> dict[str, bytes]:
    """`{path}/hyperparams.json` + `{path}/checkpoints/final.safetensors` (bf16, nn.Linear layout) of an SAE on
    `blocks.{layer}.hook_{site}` (resid_post, attn_out or mlp_out)."""
    hyper = {
        "d_model": D_IN,
        "d_sae": d_sae,
        "expansion_factor": d_sae // D_IN,
        "hook_point_in": f"blocks.{layer}.hook_{site}",
        "hook_point_out": f"blocks.{layer}.hook_{site}",
        "jump_relu_threshold": 0.05,
        "dataset_average_activation_norm": {"in": math.sqrt(D_IN) / norm_scaling_factor, "out": 1.0},
        "dtype": "torch.bfloat16",
        "device": "cuda",
        "seed": 42,
    }
    weights = save_safetensors(_linear(D_IN, d_sae, seed, torch.bfloat16))
    return _write(
        root,
        {
            f"{path}/hyperparams.json": json.dumps(hyper).encode(),
            f"{path}/checkpoints/final.safetensors": weights,
        },
    )


def llama_scope_r1(
    root: Path, path: str, layer: int, *, expansion: int = 8, seed: int = 0
) -> dict[str, bytes]:
    """`{path}/config.json` + `{path}/sae_weights.safetensors` (float32, + log_jumprelu_threshold)."""
    d_sae = D_IN * expansion
    tensors = _linear(D_IN, d_sae, seed, torch.float32)
    tensors["log_jumprelu_threshold"] = torch.log(_rand(seed + 9, d_sae, scale=0.3).abs() + 0.01)
    config = {
        "d_model": D_IN,
        "expansion_factor": expansion,
        "hook_point_in": f"blocks.{layer}.hook_resid_post",
    }
    return _write(
        root,
        {
            f"{path}/config.json": json.dumps(config).encode(),
            f"{path}/sae_weights.safetensors": save_safetensors(tensors),
        },
    )

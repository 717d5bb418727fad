"""Builders for SAE test material: random SAEs with non-trivial weights, and hand-written folders in the
formats we read (a FAST-release SAELens 5.3.3 folder, an EleutherAI sparsify folder)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub import sae_metadata
from steer.sae import SAE, SAEConfig, build_sae

SAELENS_PYTHON = Path(__file__).resolve().parents[2] / ".venv-saelens" / "bin" / "python"


def random_sae(
    arch: str = "standard",
    d_in: int = 16,
    d_sae: int = 64,
    *,
    normalize: str = "none",
    dtype: str = "float32",
    seed: int = 0,
    layer: int = 2,
    **meta,
) -> SAE:
    """Every parameter random (thresholds positive), so each tensor matters to the outputs."""
    torch.manual_seed(seed)
    cfg = SAEConfig(
        arch,
        d_in,
        d_sae,
        dtype=dtype,
        apply_b_dec_to_input=True,
        normalize_activations=normalize,
        k=6 if arch == "topk" else None,
        norm_scaling_factor=0.37 if normalize == "expected_average_only_in" else None,
        metadata=sae_metadata("tiny-llama", layer, context_size=256, **meta),
    )
    sae = build_sae(cfg)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
        if arch == "jumprelu":
            sae.threshold.abs_()
    return sae


def fast_release_cfg(d_in: int, d_sae: int, layer: int, arch: str) -> dict:
    """A flat SAELens 5.3.3 training config as in the FAST paper's `Geaming/<Model>_SAEs` release."""
    return {
        "model_name": "Qwen/Qwen2.5-0.5B-Instruct",
        "model_class_name": "HookedTransformer",
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hook_eval": "NOT_IN_USE",
        "hook_layer": layer,
        "hook_head_index": None,
        "dataset_path": "FAST/chat-mix",
        "dataset_trust_remote_code": True,
        "streaming": True,
        "is_dataset_tokenized": True,
        "context_size": 2048,
        "use_cached_activations": False,
        "architecture": arch,
        "d_in": d_in,
        "d_sae": d_sae,
        "b_dec_init_method": "zeros",
        "expansion_factor": d_sae // d_in,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "normalize_sae_decoder": False,
        "noise_scale": 0.0,
        "apply_b_dec_to_input": True,
        "decoder_orthogonal_init": False,
        "decoder_heuristic_init": True,
        "init_encoder_as_decoder_transpose": True,
        "training_tokens": 40000000,
        "finetuning_tokens": 0,
        "train_batch_size_tokens": 4096,
        "normalize_activations": "none",
        "seqpos_slice": [None],
        "device": "cuda",
        "act_store_device": "cuda",
        "seed": 42,
        "dtype": "float32",
        "prepend_bos": True,
        "jumprelu_init_threshold": 0.001,
        "jumprelu_bandwidth": 0.001,
        "l1_coefficient": 5.0,
        "lp_norm": 1.0,
        "lr": 5e-05,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "5.3.3",
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "scale_sparsity_penalty_by_decoder_norm": True,
        "mse_loss_normalization": None,
    }


def write_fast_release_sae(
    root: Path, method: str = "FAST", layer: int = 2, arch: str = "jumprelu", d_in: int = 16, mult: int = 8
) -> tuple[Path, dict[str, torch.Tensor]]:
    """`root/{method}/blocks_{L}_hook_resid_post_{mult}X_2048_{arch}/` with cfg.json + sae_weights.safetensors."""
    d_sae = d_in * mult
    folder = root / method / f"blocks_{layer}_hook_resid_post_{mult}X_2048_{arch}"
    folder.mkdir(parents=True)
    torch.manual_seed(layer)
    tensors = {
        "W_enc": torch.randn(d_in, d_sae) * 0.3,
        "b_enc": torch.randn(d_sae) * 0.3,
        "W_dec": torch.randn(d_sae, d_in) * 0.3,
        "b_dec": torch.randn(d_in) * 0.3,
    }
    if arch == "jumprelu":
        tensors["threshold"] = torch.rand(d_sae) * 0.3
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(fast_release_cfg(d_in, d_sae, layer, arch)))
    return folder, tensors


def write_sparsify_sae(root: Path, layer: int = 3, d_in: int = 16, num_latents: int = 64, k: int = 8):
    """`root/layers.{L}/` with sparsify's cfg.json + sae.safetensors (bfloat16), and `root/config.json`."""
    folder = root / f"layers.{layer}"
    folder.mkdir(parents=True)
    torch.manual_seed(layer)
    tensors = {
        "encoder.weight": (torch.randn(num_latents, d_in) * 0.3).to(torch.bfloat16),
        "encoder.bias": (torch.randn(num_latents) * 0.3).to(torch.bfloat16),
        "W_dec": (torch.randn(num_latents, d_in) * 0.3).to(torch.bfloat16),
        "b_dec": (torch.randn(d_in) * 0.3).to(torch.bfloat16),
    }
    save_file(tensors, str(folder / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": num_latents,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    run = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dataset": "chat-mix",
        "ctx_len": 1024,
        "batch_size": 8,
    }
    (root / "config.json").write_text(json.dumps(run))
    return folder, tensors


def fake_hub_cache(root, repo_id: str, files: dict[str, bytes]) -> str:
    """The Hugging Face cache layout hf_hub_download reads offline: refs/main -> snapshots/<commit>/..."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return commit


def run_saelens_worker(worker: Path, work: Path) -> None:
    """Run `worker` (a script reading and writing `work`) with SAELens's venv, offline, reading the Hugging Face
    cache `work/hf-cache` (`fake_hub_cache`); fail the test with its stderr when it fails."""
    if not SAELENS_PYTHON.exists():
        pytest.fail(f"{SAELENS_PYTHON} is missing: run `make saelens-venv` (SAELens lives in its own venv)")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "HF_HUB_CACHE": str(work / "hf-cache"),
    }
    proc = subprocess.run(
        [str(SAELENS_PYTHON), str(worker), str(work)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, f"SAELens worker failed:\n{proc.stderr[-4000:]}"

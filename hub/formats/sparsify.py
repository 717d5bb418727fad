"""EleutherAI sparsify folders: `cfg.json` + `sae.safetensors` with `encoder.weight [d_sae, d_in]`,
`encoder.bias`, `W_dec [d_sae, d_in]`, `b_dec`; TopK with `k`. The folder is named after the hooked
module (`layers.12`), and a training `config.json` one level up may name the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub.formats.base import (
    FileTensor,
    FolderLayout,
    build_config,
    hook_metadata_from_module_name,
    positive_int,
    topk_k,
    transpose,
)
from hub.validate import SAEFormatError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"

# Options that add parts our SAE does not have; a folder using any of them cannot be read faithfully.
_UNSUPPORTED = {
    "transcode": "it is a transcoder (predicts a module's output), not an autoencoder",
    "skip_connection": "it has a linear skip connection (W_skip)",
    "embed_skip": "it has an embedding skip connection",
    "gram_lookup": "it subtracts an n-gram lookup table from its input",
}


def is_sparsify(cfg: dict[str, Any]) -> bool:
    return "d_sae" not in cfg and ("num_latents" in cfg or "expansion_factor" in cfg)


def parse(cfg: dict[str, Any], where: str, folder: Path, run_config: dict[str, Any] | None) -> FolderLayout:
    if cfg.get("d_in") is None:
        raise SAEFormatError(f"{where}: sparsify cfg.json lacks required key d_in")
    d_in = positive_int(cfg, "d_in", where)
    for option, why in _UNSUPPORTED.items():
        if cfg.get(option):
            raise SAEFormatError(f"{where}: cannot load this sparsify folder: {why} ({option}=true)")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAEFormatError(f"{where}: sparsify activation {activation!r} is not supported; expected 'topk'")
    d_sae = cfg.get("num_latents") or d_in * positive_int(cfg, "expansion_factor", where)
    metadata: dict[str, Any] = hook_metadata_from_module_name(folder.name)
    if run_config:
        for ours, theirs in (
            ("model_name", "model"),
            ("dataset_path", "dataset"),
            ("context_size", "ctx_len"),
        ):
            if run_config.get(theirs) is not None:
                metadata[ours] = run_config[theirs]
    sae_cfg = build_config(
        where,
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        apply_b_dec_to_input=True,
        k=topk_k(cfg.get("k"), d_sae, where),
        metadata=metadata,
    )
    tensors = [
        FileTensor("encoder.weight", (d_sae, d_in), "W_enc", transpose),
        FileTensor("encoder.bias", (d_sae,), "b_enc"),
        FileTensor("W_dec", (d_sae, d_in), "W_dec"),
        FileTensor("b_dec", (d_in,), "b_dec"),
    ]
    return FolderLayout("sparsify", sae_cfg, WEIGHTS_FILE, tensors, None)

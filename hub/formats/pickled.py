"""Releases stored only as pickles (`torch.save`): Goodfire `.pth`/`.pt`, dictionary_learning `ae.pt`
(andyrdt, SAEBench...), Qwen-Scope `layer{n}.sae.pt`.

They are never loaded by default: `torch.load` is a pickle parser on untrusted input (CVE-2025-32434,
CVE-2026-24747). `refusal` says why and what to run; `fast-steer convert --allow-pickle` (`hub.convert`)
turns one file into a SAELens v6 folder with the key mapping of `to_saelens` below.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from hub.validate import SAEFormatError
from steer.sae import SAEConfig

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")
CONVERT_COMMAND = "fast-steer convert --allow-pickle {src} --out DIR --sha256 HASH"


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def refusal(what: str, src: str) -> SAEFormatError:
    """The error for a pickle-only SAE: why it is not loaded, and the command that converts it."""
    return SAEFormatError(
        f"{what} is stored only as a pickle (torch.save), which fast-steer never loads by default: unpickling "
        "untrusted files can run code (torch.load has had such bugs, CVE-2025-32434 and CVE-2026-24747). "
        "Download the file, check its SHA-256 against the publisher's, and convert it once to a safetensors "
        f"folder with: {CONVERT_COMMAND.format(src=src)}; then load DIR."
    )


def _layer_from_name(name: str, pattern: str) -> int | None:
    match = re.search(pattern, name)
    return int(match.group(1)) if match else None


def _resid_metadata(layer: int | None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if layer is not None:
        meta.update(
            hook_name=f"blocks.{layer}.hook_resid_post",
            hook_layer=layer,
            hf_hook_name=f"model.layers.{layer}",
        )
    return meta


def _require(state: dict[str, Any], keys: tuple[str, ...], kind: str, where: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise SAEFormatError(
            f"{where}: a {kind} state dict needs {', '.join(keys)}; missing {', '.join(missing)}"
        )


def to_saelens(
    state: dict[str, Any], src: Path, side_config: dict[str, Any] | None
) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """Map an unpickled state dict (Goodfire, dictionary_learning BatchTopK / TopK / standard, Qwen-Scope)
    to our SAE config and SAELens-oriented tensors. `side_config` is the `config.json` beside the file."""
    where = str(src)
    side_config = side_config or {}
    if "encoder_linear.weight" in state:  # Goodfire: nn.Linear pair, raw (not unit-norm) decoder rows
        _require(
            state,
            ("encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias"),
            "Goodfire",
            where,
        )
        W_enc = state["encoder_linear.weight"].T
        tensors = {
            "W_enc": W_enc,
            "b_enc": state["encoder_linear.bias"],
            "W_dec": state["decoder_linear.weight"].T,
            "b_dec": state["decoder_linear.bias"],
        }
        meta = _resid_metadata(_layer_from_name(src.name, r"-l(\d+)\."), converted_from="goodfire")
        return SAEConfig(
            architecture="standard",
            d_in=W_enc.shape[0],
            d_sae=W_enc.shape[1],
            apply_b_dec_to_input=False,
            metadata=meta,
        ), tensors
    if "encoder.weight" in state:  # dictionary_learning
        trainer = side_config.get("trainer") or {}
        dict_class = trainer.get("dict_class", "BatchTopKSAE" if "threshold" in state else "AutoEncoder")
        b_dec_key = "bias" if dict_class == "AutoEncoder" else "b_dec"
        _require(
            state,
            ("encoder.weight", "encoder.bias", "decoder.weight", b_dec_key),
            f"dictionary_learning {dict_class}",
            where,
        )
        W_enc = state["encoder.weight"].T
        d_in, d_sae = W_enc.shape
        tensors = {
            "W_enc": W_enc,
            "b_enc": state["encoder.bias"],
            "W_dec": state["decoder.weight"].T,
            "b_dec": state[b_dec_key],
        }
        meta = _resid_metadata(
            trainer.get("layer"),
            model_name=trainer.get("lm_name"),
            converted_from=f"dictionary_learning/{dict_class}",
        )
        if dict_class == "BatchTopKSAE":  # inference uses the learned global threshold (after a relu)
            tensors["threshold"] = torch.full((d_sae,), float(state["threshold"]), dtype=W_enc.dtype)
            return SAEConfig(
                architecture="jumprelu", d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True, metadata=meta
            ), tensors
        if dict_class == "AutoEncoderTopK":
            k = int(trainer.get("k") or state["k"])
            return SAEConfig(
                architecture="topk", d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=True, metadata=meta
            ), tensors
        if dict_class == "AutoEncoder":
            return SAEConfig(
                architecture="standard", d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=True, metadata=meta
            ), tensors
        raise SAEFormatError(
            f"{where}: dictionary_learning dict_class {dict_class!r} is not supported; expected BatchTopKSAE, "
            "AutoEncoderTopK or AutoEncoder"
        )
    if "W_enc" in state and "W_dec" in state:  # Qwen-Scope: W_enc [F, D], W_dec [D, F], TopK
        _require(state, ("W_enc", "b_enc", "W_dec", "b_dec"), "Qwen-Scope", where)
        W_enc = state["W_enc"].T
        d_in, d_sae = W_enc.shape
        k = side_config.get("k")
        if not isinstance(k, int):
            raise SAEFormatError(
                f"{where}: a Qwen-Scope SAE is TopK, and its k is read from the config.json beside it "
                f"(key 'k'); none found (put the repo's root config.json next to {src.name})"
            )
        tensors = {
            "W_enc": W_enc,
            "b_enc": state["b_enc"],
            "W_dec": state["W_dec"].T,
            "b_dec": state["b_dec"],
        }
        meta = _resid_metadata(
            _layer_from_name(src.name, r"layer(\d+)"),
            model_name=side_config.get("base_model"),
            converted_from="qwen-scope",
        )
        return SAEConfig(
            architecture="topk", d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=False, metadata=meta
        ), tensors
    raise SAEFormatError(
        f"{where}: unknown state dict (keys {', '.join(sorted(state)[:8])}); expected Goodfire (encoder_linear.*), "
        "dictionary_learning (encoder.weight, decoder.weight, b_dec) or Qwen-Scope (W_enc, W_dec, b_enc, b_dec)"
    )

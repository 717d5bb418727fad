"""mwhanna's Qwen3 transcoders (circuit-tracer's per-layer transcoders; SAELens converter `mwhanna_transcoder`).

A repo holds every layer as `layer_{L}.safetensors` at its root, beside `wandb-config.yaml` (in some repos
spelled `wanb-config.yaml`; `d_model.value`, `d_feature.value`) and `config.yaml` (`model_name`; missing in the
14b repos). Tensors, in circuit-tracer's layout: `W_enc [F, D]` (an `nn.Linear` weight, transposed here),
`W_dec [F, D]`, `b_enc [F]`, `b_dec [D]`, and optionally `W_skip [D, D]` (`out += x @ W_skip^T`, SAELens's
orientation too) and `activation_function.threshold [F]` (a JumpReLU; otherwise ReLU). The input is used as is.
It reads the MLP input (TransformerLens `blocks.L.mlp.hook_in`) and writes the MLP output (`hook_mlp_out`).
The YAML files are read with `yaml.safe_load`: nothing is unpickled or executed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hub.formats.base import FileTensor, FolderLayout, build_config, transpose
from hub.formats.tensor_files import open_tensor_file
from hub.validate import SAEFormatError

WANDB_CONFIG_FILES = ("wandb-config.yaml", "wanb-config.yaml")
BASE_CONFIG_FILE = "config.yaml"
THRESHOLD = "activation_function.threshold"
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SAEFormatError(f"{path} is not a readable YAML file: {exc}") from None
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def _wandb_int(raw: dict[str, Any], key: str, where: Path) -> int:
    """A wandb config value (`{key: {value: V}}`, or a plain `{key: V}`) that must be a positive int."""
    value = raw.get(key)
    value = value.get("value") if isinstance(value, dict) else value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SAEFormatError(f"{where}: {key}.value must be a positive integer, got {value!r}")
    return value


def _weights_name(folder: Path, hints: dict[str, Any]) -> str:
    """The layer file: the registry entry's path, else the only `layer_<L>.safetensors` of the folder."""
    if hints.get("path"):
        return Path(str(hints["path"])).name
    found = sorted(p.name for p in folder.glob("layer_*.safetensors"))
    if len(found) != 1:
        raise SAEFormatError(
            f"{folder} holds {len(found)} transcoder layer files ({', '.join(found[:8]) or 'none'}); load one by "
            "its SAELens release id (e.g. mwhanna-qwen3-4b-transcoders:layer_3), or put one layer file with "
            f"{WANDB_CONFIG_FILES[0]} and {BASE_CONFIG_FILE} into a folder of its own"
        )
    return found[0]


def parse(folder: Path, hints: dict[str, Any]) -> FolderLayout:
    """One layer's transcoder in a folder holding `layer_{L}.safetensors` and the repo's config files."""
    name = _weights_name(folder, hints)
    match = _LAYER_FILE.fullmatch(name)
    if match is None:
        raise SAEFormatError(
            f"{folder}/{name}: cannot tell the layer; expected a file named layer_<L>.safetensors"
        )
    layer = int(match.group(1))
    wandb_path = next((folder / f for f in WANDB_CONFIG_FILES if (folder / f).is_file()), None)
    if wandb_path is None:
        raise SAEFormatError(f"{folder}: missing file {WANDB_CONFIG_FILES[0]} (the transcoders' widths)")
    wandb = _read_yaml(wandb_path)
    d_model, d_sae = _wandb_int(wandb, "d_model", wandb_path), _wandb_int(wandb, "d_feature", wandb_path)
    base_path = folder / BASE_CONFIG_FILE
    model_name = _read_yaml(base_path).get("model_name") if base_path.is_file() else None
    repo = hints.get("repo_id") or ""
    if model_name is None and (size := re.search(r"qwen3-(\d+(?:\.\d+)?)b", repo)):
        model_name = f"Qwen/Qwen3-{size.group(1)}B"  # as SAELens does for the repos without config.yaml
    weights = folder / name
    with open_tensor_file(weights) as f:
        names = set(f.keys())
    skip, jump = "W_skip" in names, THRESHOLD in names
    architecture = {
        (False, False): "transcoder",
        (True, False): "skip_transcoder",
        (False, True): "jumprelu_transcoder",
        (True, True): "jumprelu_skip_transcoder",
    }[skip, jump]
    metadata: dict[str, Any] = {
        "hook_name": f"blocks.{layer}.mlp.hook_in",
        "hook_name_out": f"blocks.{layer}.hook_mlp_out",
        "hook_layer": layer,
        "hf_hook_name": f"model.layers.{layer}.mlp",
        "hf_hook_side": "input",
        "hf_hook_name_out": f"model.layers.{layer}.mlp",
    }
    if model_name:
        metadata["model_name"] = str(model_name)
    cfg = build_config(
        str(weights),
        architecture=architecture,
        d_in=d_model,
        d_sae=d_sae,
        d_out=d_model,
        apply_b_dec_to_input=False,
        metadata=metadata,
    )
    tensors = [
        FileTensor("W_enc", (d_sae, d_model), "W_enc", transpose),
        FileTensor("b_enc", (d_sae,), "b_enc"),
        FileTensor("W_dec", (d_sae, d_model), "W_dec"),
        FileTensor("b_dec", (d_model,), "b_dec"),
    ]
    if skip:
        tensors.append(FileTensor("W_skip", (d_model, d_model), "W_skip"))
    if jump:
        tensors.append(FileTensor(THRESHOLD, (d_sae,), "threshold"))
    return FolderLayout("mwhanna-transcoder", cfg, name, tensors, None)

"""On-disk SAE formats, one module each, recognised from a folder's files and `cfg.json`.

- `saelens`: SAELens v6 (what we write) and flat v5 configs (the FAST paper's release, SAELens 5.3.3).
- `sparsify`: EleutherAI sparsify TopK folders.
- `gemma_scope`: Gemma Scope 1 (`params.npz`) and Gemma Scope 2 (`params.safetensors` + `config.json`), SAEs
  and transcoders.
- `mwhanna`: mwhanna's Qwen3 transcoders (`layer_{L}.safetensors` + `wandb-config.yaml` + `config.yaml`).
- `llama_scope`: Llama Scope (`hyperparams.json`) and Llama-Scope-R1-Distill (`config.json`).
- `pickled`: pickle-only releases, refused (see `hub.convert` for the opt-in converter).

Nothing here unpickles: npz files are read with `allow_pickle=False`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub.formats import gemma_scope, llama_scope, mwhanna, pickled, saelens, sparsify
from hub.formats.base import FileTensor, FolderLayout
from hub.validate import SAEFormatError, read_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = saelens.WEIGHTS_FILE  # what fast-steer writes
WEIGHTS_FILES = (saelens.WEIGHTS_FILE, sparsify.WEIGHTS_FILE)  # what it reads
# The training methods of the FAST paper (`train --method` name -> label). The label is what an SAE's
# metadata records as `method`, and the paper's release keeps each SAE under `{label}/...`.
METHOD_LABELS = {"fast": "FAST", "bt-f": "BT(F)", "bt-p": "BT(P)"}

__all__ = [
    "CFG_FILE",
    "METHOD_LABELS",
    "WEIGHTS_FILE",
    "WEIGHTS_FILES",
    "FileTensor",
    "FolderLayout",
    "is_sae_folder",
    "parse_folder",
    "remote_files",
    "weights_file_for",
]


def weights_file_for(cfg: dict[str, Any]) -> str:
    """The weights file name that goes with a `cfg.json` (known before downloading it)."""
    return sparsify.WEIGHTS_FILE if sparsify.is_sparsify(cfg) else saelens.WEIGHTS_FILE


# Folders without a `cfg.json`, recognised by the files that only their format has (checked in this order).
_OTHER_LAYOUTS = (
    ((gemma_scope.GS1_WEIGHTS_FILE,), gemma_scope.parse_gs1),
    ((gemma_scope.GS2_WEIGHTS_FILE,), gemma_scope.parse_gs2),
    ((llama_scope.V1_CONFIG_FILE,), llama_scope.parse_v1),
    ((llama_scope.R1_CONFIG_FILE, llama_scope.R1_WEIGHTS_FILE), llama_scope.parse_r1),
    *(((name,), mwhanna.parse) for name in mwhanna.WANDB_CONFIG_FILES),
)


# Files to download for a registered SAE of each format without a cfg.json: (required, optional), relative
# to its folder; the first required file sits in the folder itself.
_REMOTE_FILES = {
    "gemma-scope": ((gemma_scope.GS1_WEIGHTS_FILE,), ()),
    "gemma-scope-2": ((gemma_scope.GS2_WEIGHTS_FILE,), (gemma_scope.GS2_CONFIG_FILE,)),
    "llama-scope": ((llama_scope.V1_CONFIG_FILE, llama_scope.V1_WEIGHTS_FILE), ()),
    "llama-scope-r1": ((llama_scope.R1_CONFIG_FILE, llama_scope.R1_WEIGHTS_FILE), ()),
}


def remote_files(fmt: str, path: str) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """`(folder, required, optional)`: the files to download for a registered SAE of format `fmt` at `path` in
    its Hub repo, relative to `folder` (the first required one sits in it); None for a SAELens folder, whose
    `cfg.json` says which weights file. mwhanna's `path` is one layer's file beside the repo's config files."""
    if fmt == "mwhanna-transcoder":
        folder, _, name = path.strip("/").rpartition("/")
        return folder, (name,), (*mwhanna.WANDB_CONFIG_FILES, mwhanna.BASE_CONFIG_FILE)
    if fmt not in _REMOTE_FILES:
        return None
    return path.strip("/"), *_REMOTE_FILES[fmt]


def _has(folder: Path, markers: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in markers)


def is_sae_folder(folder: Path) -> bool:
    """Whether `folder` holds an SAE of a supported layout (or a pickle-only one, refused when loaded)."""
    return (folder / CFG_FILE).is_file() or any(_has(folder, markers) for markers, _ in _OTHER_LAYOUTS)


def parse_folder(folder: Path, hints: dict[str, Any] | None = None) -> FolderLayout:
    """Describe the SAE stored in `folder`: from `cfg.json` (and sparsify's `../config.json`), else from the
    files of the other formats. `hints` are a registry entry's fields (repo id, path, norm scale...)."""
    where = str(folder)
    if not (folder / CFG_FILE).is_file():
        for markers, parse in _OTHER_LAYOUTS:
            if _has(folder, markers):
                layout = parse(folder, hints or {})
                break
        else:
            pickles = pickled.pickle_files(folder)
            if pickles:
                raise pickled.refusal(f"the SAE in {folder}", str(pickles[0]))
            raise SAEFormatError(
                f"missing file {CFG_FILE} in {folder}: it is not an SAE folder (no cfg.json, params.npz, "
                "params.safetensors, hyperparams.json, config.json + sae_weights.safetensors or wandb-config.yaml)"
            )
        if not (folder / layout.weights_file).is_file():
            raise SAEFormatError(f"{where}: missing file {layout.weights_file} ({layout.format} SAE weights)")
        return layout
    cfg = read_json(folder / CFG_FILE)
    if sparsify.is_sparsify(cfg):
        run_cfg_path = folder.parent / sparsify.RUN_CONFIG_FILE
        run_cfg = read_json(run_cfg_path) if run_cfg_path.is_file() else None
        layout = sparsify.parse(cfg, where, folder, run_cfg)
    else:
        layout = saelens.parse(cfg, where)
    if folder.parent.name in METHOD_LABELS.values():
        layout.cfg.metadata.setdefault("method", folder.parent.name)
    if not (folder / layout.weights_file).is_file():
        raise SAEFormatError(
            f"{where}: missing file {layout.weights_file} (cfg.json describes a {layout.format} SAE, "
            f"whose weights live in {layout.weights_file})"
        )
    return layout

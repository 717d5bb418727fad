"""On-disk SAE formats, one module each, recognised from a folder's files and `cfg.json`.

- `saelens`: SAELens v6 (what we write) and flat v5 configs (the FAST paper's release, SAELens 5.3.3).
- `sparsify`: EleutherAI sparsify TopK folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub.formats import saelens, sparsify
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
    "parse_folder",
    "weights_file_for",
]


def weights_file_for(cfg: dict[str, Any]) -> str:
    """The weights file name that goes with a `cfg.json` (known before downloading it)."""
    return sparsify.WEIGHTS_FILE if sparsify.is_sparsify(cfg) else saelens.WEIGHTS_FILE


def parse_folder(folder: Path) -> FolderLayout:
    """Read `folder/cfg.json` (and sparsify's `../config.json`) and describe the SAE stored there."""
    where = str(folder)
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

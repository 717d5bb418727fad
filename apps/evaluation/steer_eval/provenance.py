"""Where a steered SAE came from: its training settings, its held-out evaluation and the command that
trained it, read from the SAE folder (and from the `reproduce` folder around it) into the steer-eval JSON,
so that the report can say which SAEs were steered without reading any folder outside that JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steer.sae import SAE
from train.experiment import EVAL_FILE
from train.experiment_record import SETTINGS_FILE
from train.results_table import RESULTS_FILE

HELD_OUT_METRICS = ("l0", "explained_variance", "mse", "mse_st", "delta_lm_loss_pct")


def sae_provenance(sae: SAE, folder: Path) -> dict[str, Any]:
    """The loaded `sae`'s method, architecture, width and training tokens (its config and metadata), the
    held-out metrics in `folder`'s `eval.json` (when it was evaluated) and the command that trained it
    (when `reproduce` did)."""
    folder = Path(folder)
    meta = sae.cfg.metadata
    record: dict[str, Any] = {
        "folder": str(folder),
        "method": meta.get("method"),
        "architecture": sae.cfg.architecture,
        "d_sae": sae.cfg.d_sae,
        "training_tokens": meta.get("training_tokens"),
        "exclude_first_token": meta.get("exclude_first_token"),
        "trained_by": _reproduce_command(folder),
    }
    eval_path = folder / EVAL_FILE
    if eval_path.is_file():
        report = json.loads(eval_path.read_text(encoding="utf-8"))
        metrics = report.get("metrics", {})
        record["held_out"] = {
            "conversations": report.get("n_sequences"),
            **{k: metrics[k] for k in HELD_OUT_METRICS if k in metrics},
        }
    return record


def _reproduce_command(folder: Path) -> str | None:
    """The command recorded in the results of the `reproduce` folder holding `folder` (None if none does)."""
    for parent in folder.resolve().parents:
        if (parent / SETTINGS_FILE).is_file():
            results = parent / RESULTS_FILE
            if not results.is_file():
                return None
            return json.loads(results.read_text(encoding="utf-8")).get("command")
    return None

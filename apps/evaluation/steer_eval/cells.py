"""One (condition, strength, split) cell: run through lm-eval or read back from `cells/`; the random-direction control.

A cell is reused only when its key matches: the run's (`run_key`: model, layer, eval files by content, dtype,
device, batch size, library versions) and the cell's own (condition, SAE by content, feature, strength,
items), so that a GPU bfloat16 rerun never reads CPU float32 cells, and a moved folder still finds its own."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from apps.evaluation.lm_eval.tasks import ARC_EASY_FILES, ARC_EASY_TASK, IFEVAL_FILES, IFEVAL_TASK
from apps.evaluation.primitives import (
    added_norm,
    lm_eval_run,
)
from apps.evaluation.steer_eval.config import ARC_METRIC, IFEVAL_METRICS, Cell, Condition, SteerEvalConfig
from hub import library_versions
from hub.formats import CFG_FILE


def random_direction_sae(d_in: int, layer: int, seed: int, folder: Path, model_ref: str) -> Path:
    """Write a one-feature SAE folder whose decoder row is a seeded random unit vector (and return it)."""
    from hub.sae_io import sae_metadata, save_sae
    from steer.sae import SAEConfig, build_sae

    meta = sae_metadata(model_ref, layer, method="random-direction", seed=seed)
    sae = build_sae(SAEConfig(architecture="standard", d_in=d_in, d_sae=1, metadata=meta))
    direction = torch.randn(d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_dec[0] = (direction / direction.norm()).to(sae.W_dec.dtype)
    return save_sae(sae, folder)


def folder_digest(folder: str | Path) -> str:
    """SHA-256 over an SAE folder's `cfg.json` and weight files, so a retrained SAE invalidates its cells."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.name == CFG_FILE or path.suffix in (".safetensors", ".pt", ".bin"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(model_ref: str, layer: int, eval_data: Path, dtype: str, device: str, batch_size: int) -> dict:
    """What every cell of one steer-eval run shares: the model and layer, the eval files (by content), and
    how the numbers were computed (model dtype, `hub.describe_device`, batch size, library versions)."""
    digest = hashlib.sha256()
    for name in (*IFEVAL_FILES, *ARC_EASY_FILES):
        if (eval_data / name).is_file():
            digest.update(f"{name}\0".encode() + (eval_data / name).read_bytes())
    return {
        "model": model_ref,
        "layer": layer,
        "eval_data_sha256": digest.hexdigest(),
        "dtype": dtype,
        "device": device,
        "batch_size": batch_size,
        "versions": library_versions(),
    }


class CellRunner:
    """Runs cells through lm-eval, or reads them back from `cells/` when their settings match."""

    def __init__(
        self, cfg: SteerEvalConfig, model, tokenizer, layer: int, norm: float, task_manager, key: dict
    ):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.layer, self.norm, self.task_manager, self.key = layer, norm, task_manager, key
        self.folder = cfg.out / "cells"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.computed: list[str] = []
        self.reused: list[str] = []

    def run(self, condition: Condition, strength: float, split: str, doc_ids: list[int]) -> Cell:
        alpha = added_norm(strength, self.norm)
        name = f"{condition.name}_{strength:g}_{split}"
        path = self.folder / f"{name}.json"
        key = {
            **self.key,
            "condition": condition.name,
            "sae_sha256": folder_digest(condition.sae_dir) if condition.sae_dir else None,
            "feature": condition.feature,
            "system": condition.system,
            "alpha": alpha,
            "split": split,
            "max_new_tokens": None if split == "arc" else self.cfg.max_new_tokens,
            "doc_ids_sha256": hashlib.sha256(json.dumps(doc_ids).encode()).hexdigest(),
        }
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("key") == key:
                self.reused.append(name)
                return _cell_from_json(stored["cell"])
        start = time.perf_counter()
        task = ARC_EASY_TASK if split == "arc" else IFEVAL_TASK
        options: dict[str, Any] = {"samples": {task: doc_ids}, "log_samples": True}
        if condition.system:
            options["system_instruction"] = condition.system
        if task == IFEVAL_TASK:
            options["gen_kwargs"] = {"max_gen_toks": self.cfg.max_new_tokens}
        out = lm_eval_run(
            self.model,
            self.tokenizer,
            condition.spec(self.layer, alpha),
            [task],
            self.task_manager,
            self.cfg.batch_size,
            **options,
        )
        cell = _cell_from_samples(condition.name, strength, alpha, split, out["samples"][task])
        cell.wall_s = time.perf_counter() - start
        path.write_text(
            json.dumps({"key": key, "cell": asdict(cell)}, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        self.computed.append(name)
        return cell


def _cell_from_samples(condition: str, strength: float, alpha: float, split: str, samples: list) -> Cell:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    if split == "arc":
        metrics = {ARC_METRIC: [(float(s[ARC_METRIC]), 1.0) for s in samples]}
        return Cell(condition, strength, alpha, split, [s["doc_id"] for s in samples], metrics)
    metrics: dict[str, list[tuple[float, float]]] = {}
    for metric in IFEVAL_METRICS:
        if metric.startswith("inst_"):
            metrics[metric] = [(float(sum(s[metric])), float(len(s[metric]))) for s in samples]
        else:
            metrics[metric] = [(float(s[metric]), 1.0) for s in samples]
    return Cell(
        condition,
        strength,
        alpha,
        split,
        [s["doc_id"] for s in samples],
        metrics,
        replies=[s["filtered_resps"][0] for s in samples],
        prompts=[s["doc"]["prompt"] for s in samples],
    )


def _cell_from_json(data: dict) -> Cell:
    data["metrics"] = {k: [tuple(item) for item in v] for k, v in data["metrics"].items()}
    return Cell(**data)

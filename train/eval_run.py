"""Evaluate a trained SAE folder on conversations: the Python API behind `fast-steer eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub import LoadedModel, load_model, load_sae, sae_layer
from train.data import load_conversations
from train.evaluate import EVAL_FILE, EvalConfig, EvalResult, evaluate_sae, write_eval


def evaluate_folder(
    sae_dir: str | Path,
    data: list[str],
    *,
    loaded: LoadedModel | tuple | None = None,
    model: str | None = None,
    model_dtype: str | None = None,
    cfg: EvalConfig | None = None,
    json_path: str | Path | None = None,
    progress: bool = True,
) -> tuple[EvalResult, Path]:
    """Evaluate the SAE in `sae_dir` on the held-out conversations of `data` (the same content-hash split
    the trainer used); writes `eval.json` beside the SAE (or to `json_path`). Returns (result, json path)."""
    sae_dir = Path(sae_dir)
    sae = load_sae(sae_dir)
    meta = sae.metadata
    layer = sae_layer(sae)
    if layer is None:
        raise ValueError(
            f"{sae_dir}/cfg.json names no residual-stream hook (metadata.hook_name); cannot evaluate"
        )
    fraction = float(meta.get("held_out_fraction", 0.05))
    held = load_conversations(data, split="held_out", held_out_fraction=fraction)
    if len(held) == 0:
        raise ValueError(f"no held-out conversations in {data} (held-out fraction {fraction})")
    if loaded is None:
        ref = model or meta.get("model_name") or "default"
        loaded = load_model(ref, dtype=model_dtype or meta.get("dtype", "float32"))
    mdl, tok = loaded
    result = evaluate_sae(sae, mdl, tok, list(held), layer, cfg, progress=progress)
    header: dict[str, Any] = {
        "sae_dir": str(sae_dir),
        "method": meta.get("method_id"),
        "architecture": sae.architecture,
        "d_sae": sae.d_sae,
        "model": meta.get("model_name"),
        "data": [str(d) for d in data],
        "held_out_fraction": fraction,
    }
    path = write_eval(result, json_path or sae_dir / EVAL_FILE, header)
    return result, path

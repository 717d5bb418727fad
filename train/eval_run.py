"""Evaluate a trained SAE folder on conversations: the Python API behind `fast-steer eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hub import LoadedModel, load_model, load_sae, sae_layer
from steer.errors import ConfigError
from train.data import is_held_out, load_conversations
from train.evaluate import EVAL_FILE, EvalConfig, EvalResult, evaluate_sae, write_eval

SPLITS = ("held-out", "all")


def evaluate_folder(
    sae_dir: str | Path,
    data: list[str],
    *,
    split: str = "held-out",
    loaded: LoadedModel | tuple | None = None,
    model: str | None = None,
    model_dtype: str | None = None,
    device: str = "cpu",
    cfg: EvalConfig | None = None,
    json_path: str | Path | None = None,
    progress: bool = True,
) -> tuple[EvalResult, Path]:
    """Evaluate the SAE in `sae_dir` on the conversations of `data`: `split="held-out"` keeps the same
    content-hash split the trainer held out (its fraction from the SAE's metadata), `"all"` every one.
    The model is loaded on `device` unless `loaded` is given; the SAE goes to the model's device.
    Writes `eval.json` beside the SAE (or to `json_path`); `result.split` says which conversations were
    used. Returns (result, json path)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    cfg = cfg or EvalConfig()
    sae_dir = Path(sae_dir)
    sae = load_sae(sae_dir)
    meta = sae.metadata
    layer = sae_layer(sae)
    if layer is None:
        raise ConfigError(
            f"{sae_dir}/cfg.json names no residual-stream hook (metadata.hook_name); cannot evaluate"
        )
    corpus = list(load_conversations(data))
    counts: dict[str, Any] = {"split": split, "available": len(corpus)}
    if split == "held-out":
        fraction = float(meta.get("held_out_fraction", 0.05))
        chosen = [c for c in corpus if is_held_out(c, fraction)]
        if not chosen:
            raise ConfigError(
                f"no held-out conversations among the {len(corpus)} in {', '.join(data)} (held-out fraction "
                f"{fraction:g} from {sae_dir}/cfg.json); use --split all for a dedicated evaluation set"
            )
        counts |= {"held_out_fraction": fraction, "selected": len(chosen)}
    else:
        chosen = corpus
    counts |= {
        "conversations": min(len(chosen), cfg.max_conversations),
        "max_conversations": cfg.max_conversations,
    }
    if loaded is None:
        ref = model or meta.get("model_name") or "default"
        loaded = load_model(ref, dtype=model_dtype or meta.get("dtype", "float32"), device=device)
    mdl, tok = loaded
    sae = sae.to(next(mdl.parameters()).device)
    result = evaluate_sae(sae, mdl, tok, chosen, layer, cfg, progress=progress)
    result.split = counts
    header: dict[str, Any] = {
        "sae_dir": str(sae_dir),
        "method": meta.get("method_id"),
        "architecture": sae.architecture,
        "d_sae": sae.d_sae,
        "model": meta.get("model_name"),
        "device": str(next(mdl.parameters()).device),
        "data": [str(d) for d in data],
    }
    path = write_eval(result, json_path or sae_dir / EVAL_FILE, header)
    return result, path

"""The two files `fast-steer interp run` writes (interp.json, explanations.json), in its schema, for SAE tests that
need labels without running a judge; and a shortcut that stores such labels in an SAE folder."""

from __future__ import annotations

import json
from pathlib import Path

from hub.labels import labellings_from_run, store_labellings
from train.interp.identity import sae_identity

# feature -> (rubric name, rubric score 1-5, detection explanation, balanced accuracy, density)
LABELS = {
    3: ("polite tone", 5, "polite and thankful phrasing in replies", 0.95, 0.012),
    5: ("capital city", 4, "names of capital cities such as Paris or Rome", 0.9, 0.004),
    7: ("tone of the system prompt", 2, "the default system prompt", 0.6, 0.2),
    9: ("code blocks", 3, "python code inside markdown fences", 0.7, None),
}


def write_run(
    out: Path,
    sae_folder: Path,
    judge: str = "judge-a",
    labels: dict[int, tuple] | None = None,
    validated: bool | None = None,
    date: str = "2026-12-06T10:00:00+00:00",
) -> Path:
    """`out` as `fast-steer interp run` leaves it, scored by `judge` on the SAE in `sae_folder` with fast-paper
    and detection; a `None` name stands for an answer the judge gave that could not be parsed."""
    labels = LABELS if labels is None else labels
    out.mkdir(parents=True, exist_ok=True)
    features, entries = [], []
    for index, (name, rubric, explanation, accuracy, density) in labels.items():
        features.append(
            {
                "feature": index,
                "density": density,
                "max_activation": 3.0,
                "name": name,
                "fast_paper": {"score": rubric if name else None, "name": name},
                "explanation": explanation,
                "detection": {"balanced_accuracy": accuracy},
                "proxies": None,
            }
        )
        entries.append({"feature": index, "label": name, "score": rubric if name else None,
                        "scorer": "fast-paper"})  # fmt: skip
        entries.append({"feature": index, "label": explanation, "score": accuracy, "scorer": "detection"})
    settings = {
        "date": date,
        "sae": str(sae_folder),
        "collection": {"sae": sae_identity(sae_folder)},
        "judge": {"model": judge, "url": "http://127.0.0.1:9/v1/chat/completions"},
    }
    interp = {"settings": settings, "features": features, "summary": {"judge_validated": validated}}
    (out / "interp.json").write_text(json.dumps(interp), encoding="utf-8")
    explanations = [e | {"judge_model": judge} for e in entries]
    (out / "explanations.json").write_text(json.dumps(explanations), encoding="utf-8")
    return out


def label_sae(sae_folder: Path, run_dir: Path, **run) -> None:
    """Store the labels of a written run (see `write_run`) in `sae_folder`."""
    write_run(run_dir, sae_folder, **run)
    store_labellings(sae_folder, labellings_from_run(run_dir))

"""The FAST vs BT interpretability study: `run_interp` on the FAST, BT(F) and BT(P) SAEs of one `reproduce`
folder, and reading such runs back for the report.

The SAEs are each method's fixed-coefficient (paper-view) JumpReLU SAE of the `no-first` variant where it was
trained (`train.experiment.paper_view_sae`). Examples come from the reproduce run's chat data, held-out split
(never trained on by any method). Every method's run goes to `OUT/interp/<method>/`; the collections and the
judge cache are shared under `OUT/interp/`, so a rerun (or a second judge) reuses what is there.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apps.interp.judge import JudgeConfig
from apps.interp.run import INTERP_FILE, InterpConfig, run_interp
from steer.errors import ConfigError, MissingFileError
from train.sequences import METHOD_LABELS, METHODS

STUDY_DIR = "interp"
STUDY_ARCH = "jumprelu"


def study_saes(out: Path, arch: str = STUDY_ARCH) -> dict[str, Path]:
    """Each method's paper-view `arch` SAE in the reproduce folder `out` (MissingFileError naming the missing)."""
    from train.experiment import paper_view_sae

    found = {m: paper_view_sae(out, m, arch) for m in METHODS}
    missing = [METHOD_LABELS[m] for m, folder in found.items() if folder is None]
    if missing:
        raise MissingFileError(
            f"no trained {arch} SAE for {', '.join(missing)} under {out / 'runs'}: run `fast-steer experiment "
            f"reproduce --out {out} --arch {arch} --variant no-first` (all three methods) first"
        )
    return {m: folder for m, folder in found.items() if folder is not None}


def run_study(
    out: Path,
    template: InterpConfig,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, dict[str, Any]]:
    """`run_interp` for each method's SAE in `out` into `out/interp/<method>/` with `template`'s settings
    (its `sae` and `out` are replaced; its judge cache and the collections are shared)."""
    from hub import load_model

    saes = study_saes(out)
    if model is None or tokenizer is None:  # loaded once for the three SAEs
        collect = template.collect
        model, tokenizer = load_model(collect.model, dtype=collect.dtype, device=collect.device)
    root = out / STUDY_DIR
    judge = replace(template.judge, cache_dir=root / "judge-cache")
    return {
        method: run_interp(
            replace(
                template, sae=str(folder), out=root / method, judge=judge, collection_dir=root / "collections"
            ),
            model=model,
            tokenizer=tokenizer,
        )
        for method, folder in saes.items()
    }


def study_template(out: Path, judge: JudgeConfig, **settings: Any) -> InterpConfig:
    """An InterpConfig for the study of `out`: its model and chat data (held-out split) from
    `out/experiment.json`, `settings` for the rest (`collect` included)."""
    from train.experiment import load_config

    cfg = load_config(out)
    if cfg is None:
        raise MissingFileError(f"{out} holds no experiment.json: run `fast-steer experiment reproduce` first")
    collect = settings.pop("collect")
    return InterpConfig(
        sae="",
        data=list(cfg.chat_data),
        out=out,
        judge=judge,
        collect=replace(collect, model=cfg.model),
        **settings,
    )


def load_runs(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """`interp.json` per method from `paths`: each a run folder named after its method (`fast`, `bt-f`,
    `bt-p`), or a folder holding such run folders. Clear errors for a missing file or an unknown name."""
    runs: dict[str, dict[str, Any]] = {}
    for path in paths:
        if (path / INTERP_FILE).is_file():
            if path.name not in METHODS:
                raise ConfigError(
                    f"{path} holds an {INTERP_FILE} but its folder name is not a method; name it "
                    f"{', '.join(METHODS)} (or pass the folder holding those)"
                )
            found = {path.name: path / INTERP_FILE}
        else:
            found = {m: path / m / INTERP_FILE for m in METHODS if (path / m / INTERP_FILE).is_file()}
            if not found:
                raise MissingFileError(
                    f"{path} holds no {INTERP_FILE}, neither itself nor in {', '.join(f'{m}/' for m in METHODS)}: "
                    "run `fast-steer experiment interp` (or `fast-steer interp run`) first"
                )
        for method, file in found.items():
            if method in runs:
                raise ConfigError(f"two interp runs for {METHOD_LABELS[method]} (the second: {file})")
            runs[method] = json.loads(file.read_text(encoding="utf-8"))
    return {m: runs[m] for m in METHODS if m in runs}

"""The SAEs a server starts with (`--sae NAME=REF`) and its default spec file (`--spec`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from apps.serve.steering import NamedSAE
from steer import SpecError, load_interventions
from steer.spec import SAERef, load_sae_reference, parse_sae_ref, sae_ref_key, sae_ref_name, split_sae_ref
from train.feature_table import FEATURES_FILE, read_top_features

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_named_ref(text: str) -> tuple[str, SAERef]:
    """`NAME=REF` (or just `REF`, named after its folder / repo) as (name, reference)."""
    name, sep, ref_text = text.partition("=")
    if not sep or not NAME.fullmatch(name):
        name, ref_text = "", text
    ref = parse_sae_ref(ref_text)
    return name or _name_for(ref), ref


def _name_for(ref: SAERef) -> str:
    """The name of an SAE given without one: its folder name, or repo and sub-folder, `/` and `:` as `_`."""
    name = sae_ref_name(ref).replace("/", "_").replace(":", "_")
    if not NAME.fullmatch(name):
        raise SpecError(f"cannot name the SAE {ref!r} after {name!r}; give it a name: --sae NAME=REF")
    return name


def load_named_sae(name: str, ref: SAERef, device, d_model: int) -> NamedSAE:
    """Load `ref` on `device` (checked against the model's width), with its feature table if it has one."""
    sae = load_sae_reference(ref, device=device, expected_d_in=d_model).eval()
    source, sae_id = split_sae_ref(ref)
    folder = Path(source) / (sae_id or "")
    return NamedSAE(name, sae, read_features(folder) if folder.is_dir() else None)


def load_named_saes(args: list[str], device, d_model: int) -> list[NamedSAE]:
    return [load_named_sae(*parse_named_ref(arg), device, d_model) for arg in args]


def read_features(folder: Path) -> tuple[dict[str, Any], ...] | None:
    """The top special-token features `fast-steer run` saved beside an SAE (`features.json`), if any."""
    path = folder / FEATURES_FILE
    if not path.is_file():
        return None
    return tuple(
        {"token": f.token, "feature": f.feature, "mean_max_activation": f.mean_max}
        for f in read_top_features(path)
    )


def default_steering(path: str | Path, saes: list[NamedSAE], device, d_model: int) -> list[dict[str, Any]]:
    """The spec file `path` as a request-style `steering` list, each `sae` replaced by a loaded SAE's name.

    A spec's `sae` may be the name of an `--sae` or a reference (as `fast-steer chat --spec` and the demo's
    export write them); a reference that no `--sae` names is loaded and added to `saes` (the operator's file,
    never a client's).
    """
    by_source = {sae_ref_key(s.sae.source): s.name for s in saes if s.sae.source is not None}
    names = {s.name for s in saes}
    out = []
    for spec in load_interventions(path):
        ref = spec.reference
        if isinstance(ref, str) and ref in names:
            name = ref
        else:
            name = by_source.get(sae_ref_key(ref))
            if name is None:
                if isinstance(ref, str):
                    ref = parse_sae_ref(ref)  # an error that says what the text is not
                name = _name_for(ref)
                saes.append(load_named_sae(name, ref, device, d_model))
                by_source[sae_ref_key(ref)] = name
                names.add(name)
        out.append(spec.with_sae(name).to_dict())
    return out

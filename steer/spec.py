"""The intervention spec: which SAE and layer, which features, which operation, where, how strong.

One serialisable object (dict / JSON / YAML) consumed by the hook manager, the CLI, lm-eval and the
demo. Parsing never loads an SAE: a reference (a local folder, or `{"repo": ..., "sae_id": ...}`) is
resolved by `load_sae_reference`, the only place where `steer` imports `hub`. `parse_sae_ref` is the one
parser of the textual references that users type (`DIR`, `owner/name`, `owner/name:sub/folder`, and
SAELens's `RELEASE:SAE_ID`, whose release part never contains `/`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from steer.errors import FastSteerError
from steer.sae import SAE
from steer.sites import Site, UnplaceableHook, trained_site

OPS = ("add", "scale", "set", "ablate")
LATENT_OPS = ("scale", "set", "ablate")
POSITION_MODES = ("special", "all", "prompt", "generated")
SAERef = str | dict[str, str]
_REF_KEYS = {"path", "repo", "release", "sae_id", "revision"}
_REF_SOURCES = ("path", "repo", "release")


class SpecError(FastSteerError, ValueError):
    """An intervention spec is malformed or does not fit its SAE or model; the message says what and why."""


@dataclass
class Edit:
    """One feature edit.

    - `add`: add `strength * W_dec[feature] / ||W_dec[feature]||` (strength = norm of the added vector);
    - `scale`: multiply the feature's activation by `strength`;
    - `set`: clamp the activation to `strength`;
    - `ablate`: set the activation to 0 (`strength` is ignored).
    """

    feature: int
    op: str = "add"
    strength: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.feature, bool) or not isinstance(self.feature, int) or self.feature < 0:
            raise SpecError(f"edit feature must be a non-negative int, got {self.feature!r}")
        if self.op not in OPS:
            raise SpecError(
                f"unknown edit op {self.op!r} for feature {self.feature}; expected one of {', '.join(OPS)}"
            )
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise SpecError(f"edit strength must be a number, got {self.strength!r} (feature {self.feature})")
        self.strength = 0.0 if self.op == "ablate" else float(self.strength)
        if not math.isfinite(self.strength):
            raise SpecError(f"edit strength must be finite, got {self.strength} (feature {self.feature})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Edit:
        if not isinstance(data, dict):
            raise SpecError(f"an edit must be a mapping with keys feature, op, strength; got {data!r}")
        _check_keys(data, {"feature", "op", "strength"}, "edit")
        if "feature" not in data:
            raise SpecError(f"edit {data!r} has no 'feature'")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "op": self.op, "strength": self.strength}


@dataclass
class Intervention:
    """Edits of SAE features at decoder block `layer`, at `positions`.

    Where in the block is the SAE's own site (`steer.sites`): the block's output (residual SAEs), the input of
    `o_proj` (`attn.hook_z` SAEs), the attention output (`hook_attn_out` SAEs), the MLP output (`hook_mlp_out`
    SAEs), or, for a transcoder, the MLP input it encodes and the MLP output it edits. A transcoder is named like an SAE.
    `sae`: a loaded `SAE` (serialised through the reference it was loaded from, `SAE.source`), a local
    folder, or `{"repo": "owner/name", "sae_id": "sub/folder"}`.
    `positions`: "special" (chat-template special tokens and the role names after them), "all",
    "prompt" (tokens fed as input), "generated" (tokens the model produced and fed back one at a
    time), or a list of token strings / ids.
    `allow_layer_mismatch`: apply the SAE at a `layer` other than the one it was trained on.
    """

    layer: int
    sae: SAE | SAERef
    edits: list[Edit] = field(default_factory=list)
    positions: str | list[str | int] = "special"
    allow_layer_mismatch: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise SpecError(f"layer must be a non-negative int, got {self.layer!r}")
        self.edits = [Edit.from_dict(e) if isinstance(e, dict) else e for e in self.edits]
        for edit in self.edits:
            if not isinstance(edit, Edit):
                raise SpecError(f"edits must be Edit objects or mappings, got {edit!r}")
        latent = [e.feature for e in self.edits if e.op in LATENT_OPS]
        duplicates = sorted({f for f in latent if latent.count(f) > 1})
        if duplicates:
            raise SpecError(
                f"features {duplicates} have several scale/set/ablate edits; give one per feature"
            )
        self.positions = _check_positions(self.positions)
        if not isinstance(self.allow_layer_mismatch, bool):
            raise SpecError(f"allow_layer_mismatch must be true or false, got {self.allow_layer_mismatch!r}")
        if isinstance(self.sae, SAE):
            self.check_sae(self.sae)
        else:
            _check_ref(self.sae)

    # -- validation against an SAE and a model -----------------------------------------------
    @property
    def reference(self) -> SAERef | None:
        """The SAE reference (folder or repo): the spec's own, or where its loaded SAE came from."""
        return self.sae.source if isinstance(self.sae, SAE) else self.sae

    def check_sae(self, sae: SAE) -> None:
        """Raise `SpecError` if a feature id is out of range for `sae`."""
        bad = sorted({e.feature for e in self.edits if e.feature >= sae.d_sae})
        if bad:
            raise SpecError(
                f"features {bad} are out of range for an SAE with d_sae={sae.d_sae} (layer {self.layer})"
            )

    def site(self, sae: SAE) -> Site:
        """The site this spec edits: its `layer`, at the kind of site `sae` reads. Raise `SpecError` if `sae`
        reads a hook no site covers (the embeddings...), or if `layer` is not the layer `sae` was trained on
        (unless allowed)."""
        try:
            kind, trained = trained_site(sae.metadata, transcoder=sae.transcoder)
        except UnplaceableHook as exc:
            raise SpecError(str(exc)) from None
        if trained is not None and trained != self.layer and not self.allow_layer_mismatch:
            hook = sae.metadata.get("hook_name") or sae.metadata.get("hf_hook_name") or "its metadata"
            raise SpecError(
                f"the spec edits layer {self.layer}, but its SAE was trained on layer {trained} ({hook}); "
                f"set layer to {trained}, or allow_layer_mismatch: true to apply it at layer {self.layer}"
            )
        return Site(self.layer, kind)

    def check_layer(self, n_layers: int) -> None:
        """Raise `SpecError` if `layer` is not one of a model's `n_layers` decoder blocks."""
        if self.layer >= n_layers:
            raise SpecError(
                f"layer {self.layer} is out of range for a model with {n_layers} layers (0..{n_layers - 1})"
            )

    def check_model(
        self, n_layers: int, d_model: int, sae: SAE, widths: tuple[int, int] | None = None
    ) -> Site:
        """The spec's site, after checking that the layer and the SAE's widths fit a model: `widths` are the
        `(d_in, d_out)` its site takes there (`steer.sites.site_widths`; default: the hidden size both)."""
        self.check_layer(n_layers)
        site = self.site(sae)
        d_in, d_out = widths or (d_model, d_model)
        if sae.d_in != d_in:
            what = "attn_z width (the o_proj input)" if site.kind == "attn_z" else "hidden size"
            raise SpecError(
                f"the SAE reads d_in={sae.d_in} but the model's {what} is {d_in} (layer {self.layer})"
            )
        if sae.d_out != d_out:
            raise SpecError(
                f"the transcoder writes d_out={sae.d_out} but the model's hidden size is {d_out} (layer {self.layer})"
            )
        self.check_sae(sae)
        return site

    def with_sae(self, sae: SAE | SAERef) -> Intervention:
        """A copy of this spec that uses `sae` (a loaded SAE or a reference)."""
        return replace(self, sae=sae)

    def load_sae(
        self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ) -> SAE:
        """The SAE of this spec: the loaded object as is, or the reference loaded through `hub`."""
        sae = (
            self.sae
            if isinstance(self.sae, SAE)
            else load_sae_reference(self.sae, device=device, dtype=dtype)
        )
        self.check_sae(sae)
        return sae

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        ref = self.reference
        if ref is None:
            raise SpecError(
                "this intervention holds an SAE that was not loaded from a folder or the Hub, so it has no "
                "reference to write; save it (hub.save_sae) and load it back, or give the spec a reference"
            )
        out = {
            "layer": self.layer,
            "sae": ref,
            "edits": [e.to_dict() for e in self.edits],
            "positions": self.positions,
        }
        if self.allow_layer_mismatch:
            out["allow_layer_mismatch"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], sae: SAE | None = None) -> Intervention:
        """Parse a spec mapping; with `sae`, use that loaded SAE instead of the mapping's reference."""
        if not isinstance(data, dict):
            raise SpecError(f"an intervention must be a mapping, got {type(data).__name__}")
        _check_keys(data, {"layer", "sae", "edits", "positions", "allow_layer_mismatch"}, "intervention")
        missing = [k for k in ("layer", "sae") if k not in data and not (k == "sae" and sae is not None)]
        if missing:
            raise SpecError(f"intervention is missing {', '.join(missing)}; got keys {sorted(data)}")
        edits = data.get("edits", [])
        if not isinstance(edits, list):
            raise SpecError(f"'edits' must be a list of {{feature, op, strength}} mappings, got {edits!r}")
        return cls(
            layer=data["layer"],
            sae=data["sae"] if sae is None else sae,
            edits=edits,
            positions=data.get("positions", "special"),
            allow_layer_mismatch=data.get("allow_layer_mismatch", False),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str, sae: SAE | None = None) -> Intervention:
        return cls.from_dict(_parse(text, "json"), sae=sae)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, sae: SAE | None = None) -> Intervention:
        return cls.from_dict(_parse(text, "yaml"), sae=sae)

    @classmethod
    def from_file(cls, path: str | Path, sae: SAE | None = None) -> Intervention:
        """Read one spec from a `.json`, `.yaml` or `.yml` file (relative SAE folders: see `load_interventions`)."""
        specs = load_interventions(path, sae=sae)
        if len(specs) != 1:
            raise SpecError(f"{path} holds {len(specs)} interventions; use load_interventions() for several")
        return specs[0]


def load_interventions(path: str | Path, sae: SAE | None = None) -> list[Intervention]:
    """Read a spec file holding one intervention, a list of them, or `{"interventions": [...]}` (with an
    optional `"metadata"` mapping: notes for people, such as the strength scale an exporter used, not read).

    A relative SAE folder is taken relative to the spec file when it exists there.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    kind = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(path.suffix.lower())
    if kind is None:
        raise SpecError(f"spec file {path} must end in .json, .yaml or .yml")
    data = _parse(path.read_text(encoding="utf-8"), kind, where=str(path))
    if isinstance(data, dict) and "interventions" in data:
        _check_keys(data, {"interventions", "metadata"}, "spec file")
        if not isinstance(data.get("metadata", {}), dict):
            raise SpecError(f"spec file {path}: metadata must be a mapping, got {data['metadata']!r}")
        data = data["interventions"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise SpecError(f"spec file {path} holds no interventions")
    specs = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("sae"), str):
            local = path.parent / item["sae"]
            if not Path(item["sae"]).is_absolute() and local.exists():
                item = {**item, "sae": str(local)}
        specs.append(Intervention.from_dict(item, sae=sae))
    return specs


def dump_interventions(specs: Sequence[Intervention], metadata: dict[str, Any] | None = None) -> str:
    """JSON text of several specs (a list), readable by `load_interventions`; with `metadata`, the
    `{"interventions": [...], "metadata": {...}}` form."""
    items = [s.to_dict() for s in specs]
    return json.dumps(items if metadata is None else {"interventions": items, "metadata": metadata}, indent=2)


def load_sae_reference(
    ref: SAERef,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    expected_d_in: int | None = None,
) -> SAE:
    """Turn an SAE reference into a loaded SAE (the one place `steer` imports `hub`)."""
    import hub

    _check_ref(ref)
    source, sae_id = split_sae_ref(ref)
    kwargs: dict[str, Any] = {"sae_id": sae_id, "expected_d_in": expected_d_in}
    if device is not None:
        kwargs["device"] = device
    if dtype is not None:
        kwargs["dtype"] = dtype
    if isinstance(ref, dict) and ref.get("revision"):
        kwargs["revision"] = ref["revision"]
    try:
        return hub.load_sae(source, **kwargs)
    except FastSteerError as exc:  # the files are wrong or cannot be fetched; anything else is a bug
        raise SpecError(f"could not load SAE {ref!r}: {exc}") from exc


def split_sae_ref(ref: SAERef) -> tuple[str, str | None]:
    """`(source, sae_id)` of a reference: a folder or Hub repo, and the sub-folder if any."""
    if isinstance(ref, str):
        return ref, None
    return ref.get("path") or ref.get("repo") or ref["release"], ref.get("sae_id")


def sae_ref_key(ref: SAERef | None) -> str:
    """A comparable form of a reference: the resolved SAE folder (sub-folder included), or the Hub repo,
    sub-folder and revision; "" for None."""
    if ref is None:
        return ""
    source, sae_id = split_sae_ref(ref)
    path = Path(source).expanduser()
    if isinstance(ref, str) or ref.get("path") or path.exists():
        return str((path / (sae_id or "")).resolve())
    kind = "release" if ref.get("release") else "repo"
    return json.dumps({kind: source, "sae_id": sae_id or "", "revision": ref.get("revision") or ""})


def parse_sae_ref(text: str | Path, sae_id: str | None = None) -> SAERef:
    """The reference a user typed: an existing folder, `owner/name`, `owner/name:sub/folder`, or a SAELens
    release id `RELEASE:SAE_ID` (a release has no `/`; whether it exists is checked when loading).

    `sae_id` (a sub-folder, or the SAE id of a release) may also be given apart. Folders become absolute paths.
    """
    text = str(text).strip()
    if not text:
        raise SpecError(
            "the SAE reference is empty; give a folder, owner/name, owner/name:sub/folder or RELEASE:SAE_ID"
        )
    path = Path(text).expanduser()
    if path.exists():
        folder = str(path.resolve())
        return {"path": folder, "sae_id": sae_id} if sae_id else folder
    repo, _, inline_id = text.partition(":")
    if inline_id and sae_id and inline_id != sae_id:
        raise SpecError(f"SAE {text!r} names sub-folder {inline_id!r} but sae_id {sae_id!r} was also given")
    sae_id = sae_id or inline_id
    if "/" not in repo and sae_id and repo and not repo.startswith((".", "~")):
        return {"release": repo, "sae_id": sae_id}
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")) or not all(repo.split("/")):
        raise SpecError(
            f"SAE {text!r} is neither an existing folder nor a Hub reference 'owner/name' or "
            "'owner/name:sub/folder', nor a SAELens release id 'RELEASE:SAE_ID'"
        )
    return {"repo": repo, "sae_id": sae_id} if sae_id else {"repo": repo}


def sae_ref_name(ref: SAERef) -> str:
    """A short display name: the folder name, or the Hub repo and sub-folder."""
    source, sae_id = split_sae_ref(ref)
    if isinstance(ref, dict) and (ref.get("repo") or ref.get("release")):
        return f"{source}:{sae_id}" if sae_id else source
    return f"{Path(source).name}/{sae_id}" if sae_id else Path(source).name


# -- helpers ---------------------------------------------------------------------------------
def _parse(text: str, kind: str, where: str = "spec") -> Any:
    if kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{where} is not valid JSON: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{where} is not valid YAML: {exc}") from exc


def _check_keys(data: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"unknown {what} keys {unknown}; expected {sorted(allowed)}")


def _check_positions(positions: Any) -> str | list[str | int]:
    if isinstance(positions, str):
        if positions not in POSITION_MODES:
            raise SpecError(
                f"positions={positions!r} is not a mode; expected one of {', '.join(POSITION_MODES)} "
                "or a list of token strings / ids"
            )
        return positions
    if isinstance(positions, (list, tuple)) and positions:
        for item in positions:
            if (
                isinstance(item, bool)
                or not isinstance(item, (str, int))
                or (isinstance(item, int) and item < 0)
            ):
                raise SpecError(
                    f"positions list items must be token strings or non-negative ids, got {item!r}"
                )
        return list(positions)
    raise SpecError(
        f"positions must be one of {', '.join(POSITION_MODES)} or a non-empty list of token strings / ids, "
        f"got {positions!r}"
    )


def _check_ref(ref: Any) -> None:
    if isinstance(ref, str):
        if not ref.strip():
            raise SpecError(
                "the SAE reference is an empty string; give a folder or {'repo': ..., 'sae_id': ...}"
            )
        return
    if isinstance(ref, dict):
        _check_keys(ref, _REF_KEYS, "SAE reference")
        if sum(bool(ref.get(key)) for key in _REF_SOURCES) != 1:
            raise SpecError(
                f"an SAE reference needs exactly one of 'path' or 'repo' (or 'release', a SAELens release id), got {ref!r}"
            )
        if ref.get("release") and not ref.get("sae_id"):
            raise SpecError(f"an SAE reference to a SAELens release needs its 'sae_id', got {ref!r}")
        if not all(isinstance(v, str) for v in ref.values()):
            raise SpecError(f"SAE reference values must be strings, got {ref!r}")
        return
    raise SpecError(
        f"sae must be a loaded steer.SAE, a folder path, or {{'repo': ..., 'sae_id': ...}}; got {type(ref).__name__}"
    )

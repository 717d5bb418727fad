"""Save and load SAE folders: our SAELens v6 layout out, every supported layout in, with validation."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import replace
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hub import registry
from hub.formats import CFG_FILE, WEIGHTS_FILES, is_sae_folder, parse_folder, pickled, saelens
from hub.formats.tensor_files import open_tensor_file
from hub.labels import default_labels
from hub.validate import (
    SAEFormatError,
    check_d_in,
    check_finite,
    check_tensor_dtype,
    check_tensor_names,
    check_tensor_shape,
)
from steer.errors import ConfigError
from steer.sae import SAE, build_sae, dtype_from_name, dtype_name, sae_layer  # noqa: F401 (re-exported)

_REPO_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")


# -- writing ----------------------------------------------------------------------------------
def save_sae(sae: SAE, folder: str | Path, *, fold_norm_scaling: bool = True) -> Path:
    """Write `sae` to `folder` as SAELens v6 (`cfg.json` + `sae_weights.safetensors`) and return the folder.

    The folder is written beside its final place and renamed in, so a reader never sees half a folder;
    other files already in `folder` (evaluation results...) are kept. With `fold_norm_scaling`, an
    `expected_average_only_in` scale is folded into the weights (exactly, as SAELens does at the end of
    training), because SAELens ignores that mode when loading from disk.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SAEFormatError(f"cannot save an SAE to {folder}: it exists and is not a folder")
    cfg = replace(
        sae.cfg, dtype=dtype_name(sae.dtype), device=str(sae.device), metadata=dict(sae.cfg.metadata)
    )
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    if fold_norm_scaling and cfg.normalize_activations == "expected_average_only_in":
        scale = float(cfg.norm_scaling_factor)
        tensors["W_enc"] = tensors["W_enc"] * scale
        tensors["W_dec"] = tensors["W_dec"] / scale
        tensors["b_dec"] = tensors["b_dec"] / scale
        cfg.metadata["folded_norm_scaling_factor"] = scale
        cfg = replace(cfg, normalize_activations="none", norm_scaling_factor=None)
    try:
        cfg_text = json.dumps(saelens.v6_config(cfg), indent=2)
    except TypeError as exc:
        raise SAEFormatError(f"SAE metadata must be JSON-serialisable: {exc}") from None

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / saelens.WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CFG_FILE).write_text(cfg_text + "\n", encoding="utf-8")
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by `tmp`, carrying over the files of `folder` that are not SAE files."""
    if not folder.exists():
        os.replace(tmp, folder)
        return
    ours = {CFG_FILE, *WEIGHTS_FILES}
    for entry in folder.iterdir():
        if entry.name in ours:
            continue
        if entry.is_dir():
            shutil.copytree(entry, tmp / entry.name)
        else:
            shutil.copy2(entry, tmp / entry.name)
    old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# -- reading ----------------------------------------------------------------------------------
def load_sae(
    source: str | Path,
    sae_id: str | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    expected_d_in: int | None = None,
    revision: str | None = None,
) -> SAE:
    """Load an SAE from a local folder (any supported format), a Hub repo id plus `sae_id` sub-folder, or a
    SAELens release id plus `sae_id` (as `SAE.from_pretrained(release, sae_id)`), also written
    `"RELEASE:SAE_ID"` / `"owner/name:sub/folder"` (see `hub.registry` for why that is unambiguous).

    `dtype` defaults to the stored dtype; tensors are converted one at a time. `expected_d_in` is the
    width of the model layer the SAE will be attached to; `revision` a Hub branch, tag or commit.
    Raises `SAEFormatError` (a `ValueError`) on any problem with the files, and
    `hub.remote.HubUnavailableError` when they must be downloaded but cannot. `.labels` is the default
    labelling of the folder's explanations.json (`hub.labels`), None without one (or, with a warning, when
    it is malformed). A registered SAE's metadata carries its `neuronpedia_id` (when it has one).
    """
    folder, entry = locate_sae(source, sae_id, revision=revision)
    sae = read_sae_folder(folder, dtype=dtype, device=device, expected_d_in=expected_d_in, entry=entry)
    source, sae_id, release = split_reference(source, sae_id)
    if release is not None:
        sae.source = {"release": release, "sae_id": str(sae_id)}
    elif not Path(source).expanduser().exists():  # a Hub repo: keep the reference, not the download cache
        sae.source = {"repo": str(source), **({"sae_id": sae_id} if sae_id else {})}
    if revision and isinstance(sae.source, dict):
        sae.source["revision"] = revision
    return sae


def locate_sae(
    source: str | Path, sae_id: str | None = None, *, revision: str | None = None
) -> tuple[Path, registry.ReleaseEntry | None]:
    """The local folder of an SAE reference (downloading only the files it needs) and its registry entry
    (None for a folder or Hub repo that is not registered). A pickle-only release is refused here."""
    source, sae_id, release = split_reference(source, sae_id)
    if release is None:
        entry = (
            None if Path(source).expanduser().exists() else registry.find_location(str(source), sae_id or "")
        )
        if entry is None:
            return resolve_sae_folder(source, sae_id, revision=revision), None
    else:
        entry = registry.lookup(release, sae_id)
    if entry.needs_pickle:
        raise pickled.refusal(
            f"SAELens release {release}:{sae_id} ({entry.format}, Hub {entry.repo_id}/{entry.path})",
            f"{entry.repo_id}/{entry.path}",
        )
    from hub.remote import download_release_files

    return download_release_files(entry, revision=revision), entry


def describe_reference(source: str | Path, sae_id: str | None = None) -> dict[str, Any]:
    """Where an SAE reference points, without any network call: the Hub repo, path, format, Neuronpedia
    id and whether it needs pickle for a registered release (or a registered repo + folder)."""
    source, sae_id, release = split_reference(source, sae_id)
    if release is None and Path(source).expanduser().exists():
        folder = Path(source).expanduser() / (sae_id or "")
        return {"folder": str(folder), "format": parse_folder(folder).format}
    entry = registry.lookup(release, sae_id) if release else registry.find_location(str(source), sae_id or "")
    if entry is None:
        return {
            "repo": str(source),
            "path": sae_id or "",
            "format": "detected from the files once downloaded",
        }
    return entry.describe()


def split_reference(source: str | Path, sae_id: str | None) -> tuple[str | Path, str | None, str | None]:
    """`(source, sae_id, release)`: a local folder or Hub repo (release None), or a SAELens release id.

    `"X:Y"` is split (unless it is an existing path); X is a release when it has no `/` and is not a folder.
    """
    if isinstance(source, Path) or Path(str(source)).expanduser().exists():
        return source, sae_id, None
    text = str(source).strip()
    head, colon, tail = text.partition(":")
    if colon and tail:
        if sae_id and sae_id != tail:
            raise SAEFormatError(f"SAE {text!r} names {tail!r} but sae_id {sae_id!r} was also given")
        text, sae_id = head, tail
    if "/" not in text and not text.startswith((".", "~")):
        if not registry.is_release(text):
            raise SAEFormatError(
                f"SAE source {text!r} is neither an existing folder, a Hub repo id (owner/name) nor a SAELens "
                f"release: {registry.unknown_release(text)}"
            )
        return text, sae_id, text
    return text, sae_id, None


def resolve_sae_folder(source: str | Path, sae_id: str | None = None, *, revision: str | None = None) -> Path:
    """The local folder holding the SAE `source`/`sae_id`, downloading its files from the Hub if needed."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SAEFormatError(f"{path} is a file; an SAE source is a folder holding {CFG_FILE}")
        folder = path / sae_id if sae_id else path
        if not folder.is_dir():
            raise SAEFormatError(f"{path} has no sub-folder {sae_id!r}; {_available(path)}")
        if not is_sae_folder(folder) and not pickled.pickle_files(folder):
            ids = list_sae_ids(folder)
            if ids:
                raise SAEFormatError(f"{folder} holds {len(ids)} SAE(s) in sub-folders; {_available(folder)}")
            raise SAEFormatError(f"missing file {CFG_FILE} in {folder}: it is not an SAE folder")
        return folder
    if isinstance(source, str) and _REPO_ID.fullmatch(source) and not source.startswith((".", "/", "~")):
        from hub.remote import download_sae_folder

        return download_sae_folder(source, sae_id, revision=revision)
    raise SAEFormatError(
        f"SAE source {str(source)!r} is neither an existing folder nor a Hub repo id (owner/name)"
    )


def list_sae_ids(root: str | Path, max_depth: int = 4) -> list[str]:
    """Relative paths (posix) of the SAE folders (holding `cfg.json`) below `root`."""
    root = Path(root)
    ids = []
    for cfg in root.rglob(CFG_FILE):
        rel = cfg.parent.relative_to(root)
        if rel.parts and len(rel.parts) <= max_depth and not any(p.startswith(".") for p in rel.parts):
            ids.append(rel.as_posix())
    return sorted(ids)


def _available(root: Path) -> str:
    ids = list_sae_ids(root)
    if not ids:
        return "no SAE folders found below it"
    shown = ", ".join(ids[:12]) + (f", ... ({len(ids)} in all)" if len(ids) > 12 else "")
    return f"choose sae_id from: {shown}"


def read_sae_folder(
    folder: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    expected_d_in: int | None = None,
    entry: registry.ReleaseEntry | None = None,
) -> SAE:
    """Validate and load one local SAE folder of any supported format (see `load_sae`); `entry` is its
    registry entry when it was found through one (it supplies what the files do not say)."""
    folder = Path(folder)
    layout = parse_folder(folder, _hints(entry))
    where = str(folder)
    check_d_in(layout.cfg.d_in, expected_d_in, where)
    weights = folder / layout.weights_file
    file_where = f"{folder}/{layout.weights_file}"
    target = dtype_from_name(dtype) if dtype is not None else None
    with open_tensor_file(weights) as f:
        check_tensor_names(f.keys(), [t.key for t in layout.tensors], file_where)
        stored: dict[str, str] = {}
        for t in layout.tensors:
            check_tensor_shape(t.key, f.shape(t.key), t.shape, file_where)
            stored[t.key] = check_tensor_dtype(t.key, f.dtype_code(t.key), layout.file_dtype, file_where)
        out_dtype = target or dtype_from_name(layout.file_dtype or stored[layout.tensors[0].key])
        cfg = replace(layout.cfg, dtype=dtype_name(out_dtype), device="meta")
        sae = build_sae(cfg)
        loaded: dict[str, torch.Tensor] = {}
        for t in layout.tensors:  # one tensor at a time: peak memory stays near one copy
            tensor = f.get(t.key)
            if t.transform is not None:
                tensor = t.transform(tensor)
            tensor = tensor.to(device=device, dtype=out_dtype)
            check_finite(t.key, tensor, file_where)
            loaded[t.target] = tensor
    if layout.fold is not None:
        layout.fold(loaded)
    sae.load_state_dict(loaded, strict=True, assign=True)
    sae.cfg.device = str(device)
    sae.source = str(folder.resolve())
    sae.labels = default_labels(folder, sae.d_sae)
    if layout.format != "saelens-v6":
        sae.cfg.metadata.setdefault("converted_from", layout.format)
    if entry is not None:
        sae.cfg.metadata.setdefault("saelens_release", entry.release)
        sae.cfg.metadata.setdefault("saelens_sae_id", entry.sae_id)
        if entry.neuronpedia:
            sae.cfg.metadata.setdefault("neuronpedia_id", entry.neuronpedia)
    return sae


def _hints(entry: registry.ReleaseEntry | None) -> dict[str, Any]:
    """What a registry entry tells a format parser that its files may not: repo id, path, norm scale."""
    if entry is None:
        return {}
    return {"repo_id": entry.repo_id, "path": entry.path, "norm_scaling_factor": entry.norm_scaling_factor}


# -- metadata ---------------------------------------------------------------------------------
def _package_version() -> str:
    try:
        return importlib_metadata.version("fast-steer")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def sae_metadata(
    model_name: str,
    layer: int,
    *,
    context_size: int | None = None,
    prepend_bos: bool = False,
    dataset_path: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """SAELens-style `metadata` for an SAE on the residual stream after decoder block `layer`.

    Gives `model_name`, `hook_name="blocks.{layer}.hook_resid_post"`, `hook_layer`, `hook_head_index`,
    `prepend_bos`, `context_size`, `dataset_path`, `sae_lens_version` (the config format) and
    `fast_steer_version`; `extra` adds provenance such as `method` ("FAST", "BT(F)", "BT(P)"),
    `training_tokens`, `chat_template_sha256`, `special_token_ids`, `expansion_factor`.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ConfigError(f"layer must be a non-negative integer (decoder block index), got {layer!r}")
    meta: dict[str, Any] = {
        "model_name": model_name,
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hook_layer": layer,
        "hook_head_index": None,
        "prepend_bos": prepend_bos,
        "context_size": context_size,
        "dataset_path": dataset_path,
        "sae_lens_version": saelens.FORMAT_VERSION,
        "fast_steer_version": _package_version(),
        **extra,
    }
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise ConfigError(f"SAE metadata must be JSON-serialisable: {exc}") from None
    return meta

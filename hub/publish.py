"""Publish SAE folders as sub-folders of a Hub model repo (with a model card), and pull them back. Feature
labels (`explanations.json`, `hub.labels`) travel with their SAE both ways and show in the card."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import create_repo, hf_hub_download, upload_folder
from huggingface_hub.errors import HfHubHTTPError

from hub.card import CardEntry, render_card
from hub.formats import CFG_FILE, parse_folder, saelens
from hub.labels import LABELS_FILE, read_labels
from hub.remote import HubUnavailableError, list_remote_sae_ids, require_hub, resolve_token, scrub
from hub.sae_io import locate_sae, read_sae_folder, resolve_sae_folder, sae_layer, save_sae
from hub.validate import read_json
from steer.errors import ConfigError
from steer.sae import SAE

CARD_FILE = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload SAEs with fast-steer"
_REPO_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")


@dataclass
class PushResult:
    """What a push did: the repo, the SAE sub-folders, the staged tree (kept for a dry run) and the URL."""

    repo_id: str
    sae_ids: list[str]
    tree: Path | None
    url: str | None


def sae_subfolder(sae: SAE, source: Path) -> str:
    """`{method}/blocks_{L}_hook_resid_post_{exp}X[_{ctx}]_{arch}` from metadata (the FAST release naming);
    the source folder's name when the metadata names no residual-stream hook."""
    meta = sae.metadata
    hook = meta.get("hook_name")
    if not hook or sae_layer(sae) is None:
        return _safe(source.name)
    expansion = sae.d_sae / sae.d_in
    width = f"{expansion:g}X" if expansion == int(expansion) else f"{sae.d_sae}"
    parts = [str(hook).replace(".", "_"), width]
    if meta.get("context_size"):
        parts.append(str(meta["context_size"]))
    parts.append(sae.architecture)
    name = "_".join(parts)
    return f"{_safe(str(meta['method']))}/{name}" if meta.get("method") else name


def _safe(name: str) -> str:
    return re.sub(r"[^\w().+-]", "_", name) or "sae"


def _extra_files(folder: Path) -> list[Path]:
    """Files that travel with an SAE: results JSON and labels beside it and SAELens' `sparsity.safetensors`."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and ((p.suffix == ".json" and p.name != CFG_FILE) or p.name == saelens.SPARSITY_FILE)
    )


def stage_tree(folders: list[str | Path], out: Path) -> list[CardEntry]:
    """Write into `out` exactly what a push uploads: each SAE re-saved (validated, SAELens v6) in its
    sub-folder with its extra files, and the model card `README.md` at the root. Malformed labels are refused
    (`hub.labels.LabelsFormatError`), never uploaded."""
    if not folders:
        raise ConfigError("push needs at least one SAE folder")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; give an empty or new folder for the upload tree")
    sources: dict[str, Path] = {}
    entries = []
    for given in folders:
        folder = resolve_sae_folder(Path(given))
        labels = read_labels(folder, parse_folder(folder).cfg.d_sae)  # refused before the SAE warns of it
        sae = read_sae_folder(folder)
        sub = sae_subfolder(sae, folder)
        if sub in sources:
            raise ConfigError(
                f"{folder} and {sources[sub]} would both be uploaded as {sub!r}; give them different metadata "
                "(method, layer, width, architecture) or folder names"
            )
        sources[sub] = folder
        dest = save_sae(sae, out / sub)
        evals = {}
        for extra in _extra_files(folder):
            shutil.copy2(extra, dest / extra.name)
            if extra.suffix == ".json" and extra.name != LABELS_FILE:
                evals[extra.name] = read_json(extra)
        entries.append(CardEntry(sub, read_json(dest / CFG_FILE), evals, labels))
    return entries


def push_saes(
    folders: list[str | Path],
    repo_id: str,
    *,
    dry_run_dir: str | Path | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> PushResult:
    """Upload SAE folders as sub-folders of the Hub model repo `repo_id` (created if needed) with a model card.

    With `dry_run_dir`, write the exact upload tree there and upload nothing. The token comes from the
    argument, `$HF_TOKEN` or the `hf auth login` store, and never appears in messages.
    """
    if not _REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"repo id {repo_id!r} must look like owner/name")
    if dry_run_dir is not None:
        tree = Path(dry_run_dir)
        entries = stage_tree(folders, tree)
        (tree / CARD_FILE).write_text(render_card(repo_id, entries), encoding="utf-8")
        return PushResult(repo_id, [e.sae_id for e in entries], tree, None)

    require_hub(f"push to {repo_id}")
    secret = resolve_token(token)
    if not secret:
        raise HubUnavailableError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again"
        )
    with tempfile.TemporaryDirectory(prefix="fast-steer-push-") as tmp:
        tree = Path(tmp)
        entries = stage_tree(folders, tree)
        sae_ids = [e.sae_id for e in entries]
        try:
            create_repo(repo_id, token=secret, private=private, exist_ok=True)
            entries += _entries_already_there(repo_id, {e.sae_id for e in entries}, secret)
            (tree / CARD_FILE).write_text(render_card(repo_id, entries), encoding="utf-8")
            commit = upload_folder(
                repo_id=repo_id, folder_path=tree, commit_message=commit_message, token=secret
            )
        except HfHubHTTPError as exc:
            raise HubUnavailableError(f"uploading to {repo_id} failed: {scrub(str(exc), secret)}") from None
    return PushResult(repo_id, sae_ids, None, getattr(commit, "commit_url", None))


def _entries_already_there(repo_id: str, pushed: set[str], token: str) -> list[CardEntry]:
    """Card entries for the SAEs a repo already holds, so the new card lists them too."""
    entries = []
    for sae_id in list_remote_sae_ids(repo_id, token=token):
        if sae_id not in pushed:
            cfg_path = hf_hub_download(repo_id, f"{sae_id}/{CFG_FILE}", token=token)
            entries.append(CardEntry(sae_id, read_json(Path(cfg_path))))
    return entries


def pull_sae(
    repo_id: str, sae_id: str | None = None, *, out: str | Path | None = None, dtype: str | None = None
) -> tuple[SAE, Path, Path | None]:
    """Download (only the needed files), validate and load one SAE; with `out`, also save it there in the
    SAELens v6 layout (e.g. to convert a FAST release SAE), its labels with it. Returns (sae, source folder,
    written folder)."""
    source, entry = locate_sae(repo_id, sae_id)
    sae = read_sae_folder(source, dtype=dtype, entry=entry)
    written = save_sae(sae, out) if out is not None else None
    if written is not None and (source / LABELS_FILE).is_file():
        shutil.copy2(source / LABELS_FILE, written / LABELS_FILE)
    return sae, source, written


def describe_sae(sae: SAE) -> dict[str, object]:
    """A flat summary of an SAE for printing."""
    meta = sae.metadata
    summary: dict[str, object] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "layer": sae_layer(sae),
    }
    if sae.cfg.k is not None:
        summary["k"] = sae.cfg.k
    for key in ("hook_name", "model_name", "method", "converted_from", "sae_lens_training_version"):
        if meta.get(key) is not None:
            summary[key] = meta[key]
    summary["normalize_activations"] = sae.cfg.normalize_activations
    summary["apply_b_dec_to_input"] = sae.cfg.apply_b_dec_to_input
    return summary


def format_summary(summary: dict[str, object]) -> str:
    return "\n".join(
        f"{key:>22}: {json.dumps(value) if isinstance(value, (dict, list)) else value}"
        for key, value in summary.items()
    )

"""Talking to the Hugging Face Hub: fetch one SAE's files, list a repo's SAEs, find the token.

Files are taken from the local Hugging Face cache when there; otherwise the Hub must be reachable
(checked in milliseconds, see `hub.cache.hub_reachable`) or the call fails at once with a clear message.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub.cache import hub_reachable
from hub.formats import CFG_FILE, remote_files, sparsify, weights_file_for
from hub.labels import LABELS_FILE
from hub.registry import ReleaseEntry
from hub.validate import SAEFormatError, read_json
from steer.errors import FastSteerError


class HubUnavailableError(FastSteerError, RuntimeError):
    """The Hub is needed (files not cached, or an upload) but cannot be reached or refused the request."""


def resolve_token(token: str | None = None) -> str | None:
    """The token to use: the argument, else `$HF_TOKEN`, else the one saved by `hf auth login`."""
    return token or os.environ.get("HF_TOKEN") or get_token()


def scrub(text: str, token: str | None) -> str:
    """`text` with the token masked, for messages that might echo a request."""
    return text.replace(token, "***") if token else text


def require_hub(action: str) -> None:
    ok, why = hub_reachable()
    if not ok:
        raise HubUnavailableError(f"cannot {action}: the Hugging Face Hub is unreachable ({why})")


def _fetch(
    repo_id: str, filename: str, revision: str | None, token: str | None, optional: bool = False
) -> Path | None:
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    ok, why = hub_reachable()
    if not ok:
        if optional:
            return None
        raise HubUnavailableError(
            f"cannot download {filename} from {repo_id}: the Hugging Face Hub is unreachable ({why}) and the "
            f"file is not in the local cache {constants.HF_HUB_CACHE}"
        )
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except RepositoryNotFoundError:
        raise SAEFormatError(
            f"Hub repo {repo_id} not found (if it is private or gated, set HF_TOKEN or run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise SAEFormatError(f"Hub repo {repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        if optional:
            return None
        folder = filename.rsplit("/", 1)[0] if "/" in filename else ""
        ids = list_remote_sae_ids(repo_id, revision=revision, token=token)
        hint = f"choose sae_id from: {', '.join(ids[:12])}" if ids else "it holds no SAE folders"
        raise SAEFormatError(
            f"Hub repo {repo_id} has no {filename} (no SAE at {folder or 'the root'!r}); {hint}"
        ) from None
    except HfHubHTTPError as exc:
        raise HubUnavailableError(
            f"downloading {filename} from {repo_id} failed: {scrub(str(exc), token)}"
        ) from None


def download_sae_folder(
    repo_id: str, sae_id: str | None = None, *, revision: str | None = None, token: str | None = None
) -> Path:
    """Download only the files of one SAE (`cfg.json` first, then its weights) and return its cached folder."""
    token = resolve_token(token)
    prefix = f"{sae_id.strip('/')}/" if sae_id else ""
    cfg_path = _fetch(repo_id, prefix + CFG_FILE, revision, token)
    cfg = read_json(cfg_path)
    _fetch(repo_id, prefix + weights_file_for(cfg), revision, token)
    _fetch(repo_id, prefix + LABELS_FILE, revision, token, optional=True)
    if sparsify.is_sparsify(cfg) and prefix:
        parent = prefix.rstrip("/").rsplit("/", 1)[0] + "/" if "/" in prefix.rstrip("/") else ""
        _fetch(repo_id, parent + sparsify.RUN_CONFIG_FILE, revision, token, optional=True)
    return cfg_path.parent


def download_release_files(
    entry: ReleaseEntry, *, revision: str | None = None, token: str | None = None
) -> Path:
    """Download the files of a registered SAELens release entry (only those its format needs) and return
    its cached folder."""
    files = remote_files(entry.format, entry.path)
    if files is None:  # a SAELens folder: cfg.json says which weights file
        return download_sae_folder(entry.repo_id, entry.path, revision=revision, token=token)
    token = resolve_token(token)
    folder, required, optional = files
    prefix = f"{folder}/" if folder else ""
    paths = [_fetch(entry.repo_id, prefix + name, revision, token) for name in required]
    for name in optional:
        _fetch(entry.repo_id, prefix + name, revision, token, optional=True)
    return paths[0].parent


def list_remote_sae_ids(repo_id: str, *, revision: str | None = None, token: str | None = None) -> list[str]:
    """Sub-folders of a Hub repo that hold a `cfg.json` (needs the Hub)."""
    require_hub(f"list the SAEs of {repo_id}")
    files = HfApi().list_repo_files(repo_id, revision=revision, token=resolve_token(token))
    return sorted(f.rsplit("/", 1)[0] for f in files if f.endswith("/" + CFG_FILE))

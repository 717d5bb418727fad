"""What a collection is keyed by: the identity of an SAE (its files) and of a list of conversations."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hub.formats import CFG_FILE, parse_folder
from hub.sae_io import resolve_sae_folder
from steer.errors import ConfigError
from steer.sae import SAE
from train.data import Conversation, content_hash


def sae_folder(sae: SAE | str | Path) -> Path:
    """The local folder an SAE was read from (a folder path, or a loaded SAE's `source`)."""
    if isinstance(sae, (str, Path)):
        return resolve_sae_folder(sae)
    source = sae.source
    if isinstance(source, dict):
        return resolve_sae_folder(source["repo"], source.get("sae_id"), revision=source.get("revision"))
    if isinstance(source, str) and Path(source).is_dir():
        return Path(source)
    raise ConfigError(
        "this SAE was not read from a folder, so a collection cannot be keyed by its files; "
        "save it with hub.sae_io.save_sae and load it from there"
    )


def sae_identity(sae: SAE | str | Path) -> dict[str, Any]:
    """sha256 of the SAE's weight file and of its cfg.json, a digest of both, and the folder."""
    folder = sae_folder(sae)
    weights = folder / parse_folder(folder).weights_file
    out = {"weights_sha256": file_sha256(weights), "cfg_sha256": file_sha256(folder / CFG_FILE)}
    out["digest"] = hashlib.sha256(f"{out['weights_sha256']}:{out['cfg_sha256']}".encode()).hexdigest()
    out["folder"] = str(folder.resolve())
    return out


def data_identity(conversations: Sequence[Conversation]) -> str:
    """sha256 over the content hashes (`train.data.content_hash`) of `conversations`, in order."""
    digest = hashlib.sha256()
    for conversation in conversations:
        digest.update(content_hash(conversation).encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

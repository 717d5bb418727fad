"""A disk cache of token ids by content: a run over records tokenised before reads their ids back.

Public API:
    TokenCache(folder, max_bytes=MAX_BYTES)
        .token_lists(kind, items, tokenizer) -> list[list[int]]   ("chat": rendered with the chat template,
                                                                    as `render_conversations`; "text": as
                                                                    `text_token_lists`)
        .hits, .misses                                              (calls read back / tokenised here)
    tokenise(kind, items, tokenizer) -> list[list[int]]            (the same, without a cache)
    default_token_cache() -> TokenCache | None    (`<cache_dir>/tokens`; None with FAST_STEER_TOKEN_CACHE=0)
    tokenizer_fingerprint(tokenizer) -> str | None

Tokenising a stream's pool of 2,048 conversations (the chat template's rendering, then the Rust encoder) takes
about 0.4 s on a 2-core CPU: 3-4% of a 65k-token run, and every run over the same corpus (a sweep, a study's
variants, a re-run, a benchmark's repeats) pays it again, as `datasets.map` would without its cache.

An entry is one `.npz` (no pickle): the ids of a list of records, flat int32, and each record's length. Its
key is the sha256 over all that decides the ids: what was tokenised (`kind`), the tokenizer's fingerprint (its
whole serialised backend, chat template and eos id), the versions of transformers, tokenizers and jinja2, the
source of the code that renders and encodes (`train.sequences`, `steer.chat_template`), and each record's
content hash, in order. So a changed record, template, tokenizer or library is a new key, never a stale hit.
A tokenizer without a Rust backend has no fingerprint and is not cached. Entries are written to a temporary
file and renamed into place, so concurrent writers (data-parallel ranks) and interrupted runs never leave a
partial entry; an unreadable entry is reported, tokenised afresh and replaced. The folder is bounded
(`max_bytes`, 2 GiB by default): past it, the least recently used entries are deleted.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from hub.cache import cache_dir
from steer import chat_template
from train import sequences
from train.data import content_hash

log = logging.getLogger(__name__)

Kind = Literal["chat", "text"]
TOKEN_CACHE_ENV = "FAST_STEER_TOKEN_CACHE"
FORMAT = 1
MAX_BYTES = 2 * 2**30  # the default bound on the folder: about 1,000 pools of 2,048 conversations


def default_token_cache() -> TokenCache | None:
    """The cache under fast-steer's cache folder (`hub.cache.cache_dir`), or None where
    `FAST_STEER_TOKEN_CACHE=0` turns it off."""
    if os.environ.get(TOKEN_CACHE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return TokenCache(cache_dir() / "tokens")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """sha256 of what decides a tokenizer's ids and renderings (its serialised Rust backend, chat template and
    eos id); None for a tokenizer without a Rust backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    parts = [type(tokenizer).__name__, backend.to_str(), str(sequences.chat_template_sha256(tokenizer)),
             str(tokenizer.eos_token_id), str(getattr(tokenizer, "split_special_tokens", False))]  # fmt: skip
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


@functools.cache
def _code_versions() -> str:
    """The libraries' versions and the source of fast-steer's rendering and encoding code."""
    versions = [
        f"{name}={importlib.metadata.version(name)}" for name in ("transformers", "tokenizers", "jinja2")
    ]
    source = "".join(inspect.getsource(module) for module in (sequences, chat_template))
    return "\0".join([*versions, hashlib.sha256(source.encode("utf-8")).hexdigest()])


def tokenise(kind: Kind, items: Sequence, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each record's token ids, tokenised now: "chat" as `render_conversations`, "text" as `text_token_lists`."""
    if kind == "chat":
        return sequences.render_conversations(tokenizer, items)
    if kind == "text":
        return sequences.text_token_lists(items, tokenizer)
    raise ValueError(f"kind must be 'chat' or 'text', got {kind!r}")


class TokenCache:
    """Token ids of lists of records, kept in `folder` by content (see the module's docstring)."""

    def __init__(self, folder: str | Path, max_bytes: int = MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be non-negative, got {max_bytes}")
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.hits = self.misses = 0

    def token_lists(self, kind: Kind, items: Sequence, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """Each record's token ids: read back where these records were tokenised with this tokenizer before,
        else tokenised and stored."""
        # ~20 ms, taken on every call: a tokenizer can be changed in place
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint is None or not items:
            return tokenise(kind, items, tokenizer)
        path = self.folder / f"{self._key(kind, fingerprint, items)}.npz"
        if path.is_file():
            stored = self._read(path, len(items))
            if stored is not None:
                self.hits += 1
                self._touch(path)
                return stored
        token_lists = tokenise(kind, items, tokenizer)
        self.misses += 1
        self._write(path, token_lists)
        return token_lists

    @staticmethod
    def _key(kind: Kind, fingerprint: str, items: Sequence) -> str:
        digest = hashlib.sha256(f"{FORMAT}\0{kind}\0{fingerprint}\0{_code_versions()}".encode())
        for item in items:
            digest.update(content_hash(item).encode("ascii"))
        return digest.hexdigest()

    @staticmethod
    def _read(path: Path, n_items: int) -> list[list[int]] | None:
        try:
            with np.load(path, allow_pickle=False) as stored:
                ids, lengths = stored["ids"], stored["lengths"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("token cache entry %s is unreadable (%s): tokenising afresh", path, exc)
            return None
        if (
            ids.ndim != 1
            or lengths.shape != (n_items,)
            or int(lengths.sum()) != len(ids)
            or (lengths < 0).any()
        ):
            log.warning(
                "token cache entry %s does not match its %d records: tokenising afresh", path, n_items
            )
            return None
        flat = ids.tolist()
        out, start = [], 0
        for length in lengths.tolist():
            out.append(flat[start : start + length])
            start += length
        return out

    def _write(self, path: Path, token_lists: list[list[int]]) -> None:
        lengths = np.fromiter((len(ids) for ids in token_lists), dtype=np.int64, count=len(token_lists))
        ids = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int32, count=int(lengths.sum()))
        temporary = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as fh:
                temporary = Path(fh.name)
                np.savez(fh, ids=ids, lengths=lengths)
            os.replace(temporary, path)
            self._evict(keep=path)
        except OSError as exc:  # a read-only or full disk costs the next run its tokenising, nothing else
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            log.warning("could not write the token cache entry %s (%s)", path, exc)

    @staticmethod
    def _touch(path: Path) -> None:
        """Mark an entry recently used (evicted last); a folder this process may read but not write keeps
        its times, and the hit stands."""
        try:
            os.utime(path)
        except OSError as exc:
            log.debug("could not mark the token cache entry %s used (%s)", path, exc)

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used entries (by modification time) until the folder holds at most
        `max_bytes`; `keep`, the entry just written, stays."""
        entries = []
        for entry in os.scandir(self.folder):
            try:
                if entry.name.endswith(".npz"):
                    stat = entry.stat()
                    entries.append((stat.st_mtime, stat.st_size, Path(entry.path)))
            except FileNotFoundError:  # deleted meanwhile by another process's eviction
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size

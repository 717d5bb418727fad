"""Load conversations and pretraining text, and split them deterministically into train / held-out.

Public API:
    load_conversations(sources, *, on_error="skip", split=None, held_out_fraction=0.05, limit=None) -> Corpus
    load_texts(sources, *, on_error="skip", split=None, held_out_fraction=0.05, limit=None) -> Corpus
    content_hash(item) -> str;  is_held_out(item, held_out_fraction) -> bool
    split_by_hash(items, held_out_fraction) -> (train, held_out)
    Corpus (kind, items, sources, problems, split), DataFormatError
    shared_data_dir(sub="") -> Path;  find_shared_data(sub="") -> Path | None   (where the shared data is)

Sources are files, folders (searched recursively for ``*.jsonl`` / ``*.json`` and, for text, ``*.txt``)
or, for conversations, a Hugging Face dataset id ``owner/name[:split]`` when the Hub is reachable.
Conversation records may be in any of three formats, detected per record:

* messages: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
* Alpaca:   ``{"instruction": "...", "input": "...", "output": "..."}`` (optional ``system``)
* ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}, ...]}``

Text records are ``{"text": "..."}`` lines, or a whole ``.txt`` file as one document.
A malformed record is reported as ``file:line: reason``; with ``on_error="skip"`` it is skipped, listed
in ``Corpus.problems`` and counted in one warning per source, with ``on_error="raise"`` a
``DataFormatError`` stops the load. Nothing is dropped silently.

The held-out split is decided by the sha256 of each record's canonical content, so it does not depend
on file order, is identical across runs and machines, and duplicates always land on the same side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steer.errors import ConfigError, FastSteerError, MissingFileError

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
OnError = Literal["skip", "raise"]
Split = Literal["train", "held_out"]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
CHAT_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
MAX_LISTED_PROBLEMS = 5
SHARED_DATA_ENV = "FAST_STEER_SHARED_DATA"


class DataFormatError(FastSteerError, ValueError):
    """A record (or source) that cannot be read; the message starts with ``file:line``."""


def shared_data_candidates() -> list[Path]:
    """Where the shared data folder is looked for, in order: ``$FAST_STEER_SHARED_DATA`` alone when it is
    set; else ``<cwd>/../shared/data``, ``<cwd>/shared/data`` and ``shared/data`` beside the source tree."""
    if os.environ.get(SHARED_DATA_ENV):
        return [Path(os.environ[SHARED_DATA_ENV]).expanduser()]
    cwd = Path.cwd()
    source_tree = Path(__file__).resolve().parents[1]
    return [cwd.parent / "shared" / "data", cwd / "shared" / "data", source_tree.parent / "shared" / "data"]


def find_shared_data(sub: str = "") -> Path | None:
    """The first existing ``<candidate>/<sub>`` of `shared_data_candidates` (e.g. `sub="chat"`), or None."""
    return next((c / sub for c in shared_data_candidates() if (c / sub).is_dir()), None)


def shared_data_dir(sub: str = "") -> Path:
    """`find_shared_data(sub)`, or a `MissingFileError` naming every place tried when there is none."""
    found = find_shared_data(sub)
    if found is None:
        tried = ", ".join(str(c / sub) for c in shared_data_candidates())
        raise MissingFileError(
            f"no shared data folder{f' {sub!r}' if sub else ''}: tried {tried}; set {SHARED_DATA_ENV} to the "
            "shared data folder, or name the data explicitly"
        )
    return found


@dataclass
class Corpus:
    """Loaded conversations (``kind="chat"``) or texts (``kind="text"``) and where they came from."""

    kind: Literal["chat", "text"]
    items: list[Any]
    sources: list[str]
    problems: list[str] = field(default_factory=list)
    split: Split | None = None
    held_out_fraction: float = 0.05

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]

    def describe(self) -> dict:
        """Provenance: kind, sources, split, record and problem counts."""
        return {
            "kind": self.kind,
            "sources": list(self.sources),
            "split": self.split,
            "held_out_fraction": self.held_out_fraction,
            "records": len(self.items),
            "skipped_records": len(self.problems),
        }


def content_hash(item: Conversation | str) -> str:
    """sha256 (hex) of a conversation's or text's canonical JSON."""
    canonical = json.dumps(item, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def source_sha256(source: str | Path, kind: str) -> str:
    """sha256 (hex) of what a local data source holds for `kind` (`chat` or `text`): a file's bytes, or the
    data files of a folder (each one's path relative to it, then its bytes), as the loaders read them."""
    path = Path(source).expanduser()
    if not path.exists():
        raise MissingFileError(f"data source {source!r} is not an existing file or folder")
    files = _data_files(path, CHAT_SUFFIXES if kind == "chat" else TEXT_SUFFIXES) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def is_held_out(item: Conversation | str, held_out_fraction: float = 0.05) -> bool:
    """Whether `item` belongs to the held-out split (first 64 bits of its hash below the fraction)."""
    return int(content_hash(item)[:16], 16) < held_out_fraction * 2**64


def split_by_hash(items: Sequence[Any], held_out_fraction: float = 0.05) -> tuple[list[Any], list[Any]]:
    """(train, held_out) by content hash; order within each part is kept."""
    _check_fraction(held_out_fraction)
    train, held = [], []
    for item in items:
        (held if is_held_out(item, held_out_fraction) else train).append(item)
    return train, held


def load_conversations(
    sources: str | Path | Sequence[str | Path],
    *,
    on_error: OnError = "skip",
    split: Split | None = None,
    held_out_fraction: float = 0.05,
    limit: int | None = None,
) -> Corpus:
    """Conversations from JSONL/JSON files, folders or a Hub dataset id (messages / Alpaca / ShareGPT)."""
    return _load("chat", sources, on_error, split, held_out_fraction, limit)


def load_texts(
    sources: str | Path | Sequence[str | Path],
    *,
    on_error: OnError = "skip",
    split: Split | None = None,
    held_out_fraction: float = 0.05,
    limit: int | None = None,
) -> Corpus:
    """Pretraining documents from JSONL ``{"text": ...}`` files, ``.txt`` files or folders of them."""
    return _load("text", sources, on_error, split, held_out_fraction, limit)


def _load(kind, sources, on_error, split, held_out_fraction, limit) -> Corpus:
    if on_error not in ("skip", "raise"):
        raise ConfigError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if split not in (None, "train", "held_out"):
        raise ConfigError(f"split must be None, 'train' or 'held_out', got {split!r}")
    _check_fraction(held_out_fraction)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of records, got {limit}")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ConfigError("no data sources given")
    corpus = Corpus(kind=kind, items=[], sources=[], split=split, held_out_fraction=held_out_fraction)
    parse = _parse_conversation if kind == "chat" else _parse_text
    for name, records in _expand(kind, sources):
        corpus.sources.append(name)
        n_problems = len(corpus.problems)
        for where, record in records:
            try:
                item = parse(record)
            except DataFormatError as exc:
                message = f"{where}: {exc}"
                if on_error == "raise":
                    raise DataFormatError(message) from None
                corpus.problems.append(message)
                continue
            if split is not None and is_held_out(item, held_out_fraction) != (split == "held_out"):
                continue
            corpus.items.append(item)
            if limit is not None and len(corpus.items) >= limit:
                break
        _warn_problems(name, corpus.problems[n_problems:])
        if limit is not None and len(corpus.items) >= limit:
            break
    if not corpus.items:
        raise DataFormatError(f"no usable {kind} records in {', '.join(corpus.sources)} (split={split})")
    return corpus


def _warn_problems(name: str, problems: list[str]) -> None:
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"
            if len(problems) > MAX_LISTED_PROBLEMS
            else ""
        )
        log.warning("%s: skipped %d malformed record(s):\n  %s%s", name, len(problems), listed, more)


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"held_out_fraction must be in [0, 1), got {fraction}")


# ---------------------------------------------------------------- sources


def _expand(kind: str, sources: Sequence[str | Path]) -> Iterator[tuple[str, Iterator[tuple[str, Any]]]]:
    """(source name, iterator of (location, raw record)) for every file / dataset."""
    suffixes = CHAT_SUFFIXES if kind == "chat" else TEXT_SUFFIXES
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            for file in _data_files(path, suffixes):
                yield str(file), _file_records(file)
        elif path.is_file():
            if path.suffix not in suffixes:
                raise DataFormatError(
                    f"{path}: unsupported file type {path.suffix!r} (expected {', '.join(suffixes)})"
                )
            yield str(path), _file_records(path)
        elif kind == "chat" and _looks_like_hub_id(str(source)):
            yield f"hf://{source}", _hub_records(str(source))
        else:
            hint = " or a Hugging Face dataset id 'owner/name[:split]'" if kind == "chat" else ""
            raise MissingFileError(f"data source {source!r} is not an existing file or folder{hint}")


def _data_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """The data files under `folder` (sorted), or a clear error when it holds none."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise MissingFileError(f"folder {folder} has no {'/'.join(suffixes)} files")
    return files


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".txt":
        yield f"{path}:1", {"text": path.read_text(encoding="utf-8")}
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise DataFormatError(
                f"{path}: a .json data file must hold a list of records, got {type(data).__name__}"
            )
        for i, record in enumerate(data):
            yield f"{path}[{i}]", record
    else:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    record = _InvalidJSON(exc.msg)
                yield f"{path}:{lineno}", record


@dataclass
class _InvalidJSON:
    reason: str


def _looks_like_hub_id(source: str) -> bool:
    name = source.split(":", 1)[0]
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def _hub_records(source: str) -> Iterator[tuple[str, Any]]:
    from hub.cache import hub_reachable

    ok, why = hub_reachable()
    if not ok:
        raise MissingFileError(
            f"data source {source!r} is not a local path and the Hub is not reachable ({why})"
        )
    import datasets

    name, _, split = source.partition(":")
    dataset = datasets.load_dataset(name, split=split or "train")
    for i, row in enumerate(dataset):
        yield f"hf://{name}:{split or 'train'}[{i}]", row


# ---------------------------------------------------------------- record formats


def _parse_conversation(record: Any) -> Conversation:
    if isinstance(record, _InvalidJSON):
        raise DataFormatError(f"invalid JSON ({record.reason})")
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], "role", "content", {r: r for r in ROLES}, "messages")
    elif "conversations" in record:
        messages = _messages(record["conversations"], "from", "value", SHAREGPT_ROLES, "conversations")
    elif "instruction" in record and "output" in record:
        messages = _alpaca(record)
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise DataFormatError(
            f"unknown conversation format (keys: {keys}); expected 'messages', 'conversations' "
            "or 'instruction'+'output'"
        )
    if not any(m["role"] == "user" for m in messages) or not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError("a conversation needs at least one user and one assistant message")
    return messages


def _messages(
    turns: Any, role_key: str, text_key: str, roles: dict[str, str], field_name: str
) -> Conversation:
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"'{field_name}' must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataFormatError(f"{field_name}[{i}] must be an object with '{role_key}' and '{text_key}'")
        role, text = turn[role_key], turn[text_key]
        if role not in roles:
            raise DataFormatError(
                f"{field_name}[{i}]: unknown role {role!r} (expected one of {', '.join(roles)})"
            )
        if not isinstance(text, str):
            raise DataFormatError(
                f"{field_name}[{i}]: '{text_key}' must be a string, got {type(text).__name__}"
            )
        out.append({"role": roles[role], "content": text})
    return out


def _alpaca(record: dict) -> Conversation:
    parts = {k: record.get(k, "") for k in ("system", "instruction", "input", "output")}
    for key, value in parts.items():
        if not isinstance(value, str):
            raise DataFormatError(f"'{key}' must be a string, got {type(value).__name__}")
    if not parts["instruction"].strip() or not parts["output"].strip():
        raise DataFormatError("'instruction' and 'output' must be non-empty")
    user = parts["instruction"] + (f"\n\n{parts['input']}" if parts["input"].strip() else "")
    messages = [{"role": "system", "content": parts["system"]}] if parts["system"].strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": parts["output"]}]


def _parse_text(record: Any) -> str:
    if isinstance(record, _InvalidJSON):
        raise DataFormatError(f"invalid JSON ({record.reason})")
    if not isinstance(record, dict) or "text" not in record:
        raise DataFormatError("expected a JSON object with a 'text' field")
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError("'text' must be a non-empty string")
    return text

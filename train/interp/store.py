"""The on-disk layout of an activation collection (safetensors and JSON only, delphi-style).

    <key>/chunks/chunk_00000.safetensors   one per chunk of conversations, written while collecting:
        token_ids int32 [n], special uint8 [n], offsets int64 [m+1] (conversation starts in the chunk),
        indptr int64 [n+1], features int32 [nnz], values float16 [nnz]   (the SAE code of the n tokens, CSR)
    <key>/tokens.safetensors               token_ids int32 [N], special uint8 [N], offsets int64 [M+1]
    <key>/index.safetensors                the code by feature (CSC): feature_ptr int64 [d_sae+1],
        token_index int32 [nnz] (ascending within a feature), values float16 [nnz];
        per feature: count int64, max float32, histogram int64 [d_sae, bins] (bins over [0, max])
    <key>/vocab.json                       token id -> decoded string, for every id in the data
    <key>/collection.json                  settings, identity and statistics; written last (the folder is
                                           complete iff it exists), after which the chunks are removed

Every file is written beside its place and renamed in, so a killed run leaves whole chunks only.
A token "fires" a feature when its activation is > 0; only those entries are stored.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

MANIFEST = "collection.json"
TOKENS = "tokens.safetensors"
INDEX = "index.safetensors"
VOCAB = "vocab.json"
CHUNKS = "chunks"
FORMAT_VERSION = 1


def chunk_path(folder: Path, index: int) -> Path:
    return folder / CHUNKS / f"chunk_{index:05d}.safetensors"


def write_atomic(path: Path, tensors: dict[str, np.ndarray] | None = None, text: str | None = None) -> None:
    """Write safetensors `tensors` or `text` to `path` through a temporary file renamed in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tensors is not None:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
    else:
        tmp.write_text(text or "", encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, text=json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def build_index(folder: Path, n_chunks: int, d_sae: int, bins: int, skip_first: bool) -> dict[str, Any]:
    """Merge the chunks into `tokens.safetensors` and the per-feature `index.safetensors`; their statistics.

    Two passes over the chunks, one chunk in memory at a time: the first counts each feature's entries and
    its peak, the second writes each chunk's entries into their feature's slice (a counting sort; chunks are
    in token order, so each slice stays ascending). Memory: the index itself plus one chunk."""
    paths = [chunk_path(folder, i) for i in range(n_chunks)]
    count, peak = np.zeros(d_sae, dtype=np.int64), np.zeros(d_sae, dtype=np.float32)
    token_ids, special, offsets, dtype, start = [], [], [], np.dtype(np.float32), 0
    for path in paths:
        c = load_file(str(path))
        token_ids.append(c["token_ids"])
        special.append(c["special"])
        offsets.append(c["offsets"][:-1] + start)
        start += len(c["token_ids"])
        dtype = c["values"].dtype
        features, values, first, chunk_count = _by_feature(c, d_sae)
        live = chunk_count > 0
        if live.any():
            peak[live] = np.maximum(peak[live], np.maximum.reduceat(values.astype(np.float32), first[live]))
        count += chunk_count
    if start >= 2**31:
        raise ValueError(f"{start} tokens exceed the int32 token index; collect fewer instances")
    token_ids, special = np.concatenate(token_ids), np.concatenate(special)
    offsets = np.concatenate([*offsets, [start]]).astype(np.int64)
    feature_ptr = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    token_index = np.empty(int(feature_ptr[-1]), dtype=np.int32)
    values = np.empty(int(feature_ptr[-1]), dtype=dtype)
    histogram = np.zeros(d_sae * bins, dtype=np.int64)
    scale = np.where(peak > 0, peak, 1.0)
    cursor, start = feature_ptr[:-1].copy(), 0
    for path in paths:
        c = load_file(str(path))
        rows = np.repeat(np.arange(len(c["token_ids"]), dtype=np.int64) + start, np.diff(c["indptr"]))
        start += len(c["token_ids"])
        order = np.argsort(c["features"], kind="stable")
        features, chunk_values, first, chunk_count = _by_feature(c, d_sae, order)
        slots = cursor[features] + np.arange(len(features)) - first[features]  # rank inside the feature
        token_index[slots] = rows[order]
        values[slots] = chunk_values
        cursor += chunk_count
        slot = np.minimum(
            (chunk_values.astype(np.float32) / scale[features] * bins).astype(np.int64), bins - 1
        )
        histogram += np.bincount(features * bins + slot, minlength=d_sae * bins)
    live = count > 0
    histogram = histogram.reshape(d_sae, bins)
    write_atomic(folder / TOKENS, {"token_ids": token_ids, "special": special, "offsets": offsets})
    write_atomic(
        folder / INDEX,
        {
            "feature_ptr": feature_ptr,
            "token_index": token_index,
            "values": values,
            "count": count,
            "max": peak,
            "histogram": histogram.astype(np.int64),
        },
    )
    n_conversations = len(offsets) - 1
    counted = len(token_ids) - (n_conversations if skip_first else 0)
    return {
        "tokens": int(len(token_ids)),
        "tokens_counted": int(counted),
        "conversations": int(n_conversations),
        "nonzero": int(len(values)),
        "mean_l0": float(len(values) / max(counted, 1)),
        "live_features": int(live.sum()),
    }


def _by_feature(
    chunk: dict[str, np.ndarray], d_sae: int, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A chunk's entries grouped by feature (stable, so in token order inside a feature): features, values,
    each feature's first position among them, and its count."""
    order = np.argsort(chunk["features"], kind="stable") if order is None else order
    features = chunk["features"].astype(np.int64)[order]
    count = np.bincount(features, minlength=d_sae).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return features, chunk["values"][order], first, count


def remove_chunks(folder: Path) -> None:
    shutil.rmtree(folder / CHUNKS, ignore_errors=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

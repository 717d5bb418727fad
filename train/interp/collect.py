"""Collect SAE activation examples once per (SAE, data, settings): `collect_examples`.

Each conversation is rendered alone with the model's chat template (FAST), the forward stops after the
SAE's layer (`train.harvest.Harvester`), the SAE encodes every residual and the non-zero code is stored
sparse, chunk by chunk (`train.interp.store`). A finalise step indexes it by feature; `Collection` reads it.

The folder is `OUT/<key>/`, where the key hashes the SAE (digests of its weight file and `cfg.json`), the data
(the content hash of every conversation, in order) and the settings that change what is stored. A later call
with the same inputs opens the folder without loading the model; a killed run resumes from its whole chunks.
Position 0 (the attention sink, ~100x the residual norm) is not encoded with `skip_first` (the rule of
`train.features`): its activations read as 0 and it is left out of every statistic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hub.sae_io import load_sae, sae_layer
from hub.validate import check_d_in
from steer.errors import ConfigError
from steer.positions import pad_token_id, resolve_special_tokens
from steer.sae import SAE
from train.data import Conversation, load_conversations
from train.harvest import Harvester
from train.interp import store
from train.interp.collection import Collection
from train.interp.identity import data_identity, sae_identity
from train.sequences import bucket_batches, fast_sequences

log = logging.getLogger(__name__)

SPLITS = ("held-out", "all")


@dataclass
class CollectConfig:
    """What a collection reads and how (`fast-steer interp collect`)."""

    instances: int = 10_000  # conversations to read (the FAST paper's 10,000); fewer if the data has fewer
    split: str = "held-out"  # held-out: train.data's hash split, never trained on; all: every conversation
    model: str = "default"  # the model reference ('default', a folder, a Hub id); part of the key
    dtype: str = (
        "auto"  # the model's dtype while collecting (auto: as `fast-steer harvest`, bfloat16 where fast)
    )
    max_len: int = 2048  # tokens per conversation (longer ones are truncated)
    skip_first: bool = True  # leave position 0 (attention sink) out: not encoded, not counted
    histogram_bins: int = 20  # bins of each feature's activation histogram over [0, max]
    chunk_conversations: int = 256  # conversations per chunk (the unit of resuming)
    token_budget: int = 8192  # tokens per forward batch (speed only)
    device: str = "auto"  # where the model and SAE run (speed only)

    UNKEYED: ClassVar[tuple[str, ...]] = ("token_budget", "device")  # do not change what is stored

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for name in ("instances", "max_len", "histogram_bins", "chunk_conversations", "token_budget"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def keyed(self) -> dict[str, Any]:
        """The settings that change what is stored (the folder key hashes them)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.UNKEYED}


def collection_key(sae_digest: str, data_sha256: str, config: CollectConfig) -> str:
    """The folder name of a collection: 16 hex digits of the hash of its three inputs."""
    text = json.dumps(
        {"format": store.FORMAT_VERSION, "sae": sae_digest, "data": data_sha256, "settings": config.keyed()},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_data(data: str | Path | Sequence[str | Path], config: CollectConfig) -> list[Conversation]:
    """The first `config.instances` conversations of `data` in `config.split` (DataFormatError if none)."""
    corpus = load_conversations(
        data, split="held_out" if config.split == "held-out" else None, limit=config.instances
    )
    return corpus.items


def collect_examples(
    sae: str | Path | SAE,
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    config: CollectConfig | None = None,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], Any] | None = None,
) -> Collection:
    """Collect (or reuse) the activation examples of `sae` on `data` under `out/<key>/`; the Collection.

    `sae`: an SAE folder or an SAE loaded from one. `model`/`tokenizer`: an already loaded model (that of
    `config.model`, which names it in the key); loaded from `config.model` when needed otherwise.
    `on_chunk(i)` is called after chunk i is written (whatever it raises ends the run, resumable).
    """
    config = config or CollectConfig()
    identity = sae_identity(sae)
    conversations = load_data(data, config)
    data_sha = data_identity(conversations)
    folder = Path(out) / collection_key(identity["digest"], data_sha, config)
    if (folder / store.MANIFEST).is_file():
        log.info("reusing the collection in %s", folder)
        return Collection.open(folder, sae=identity)
    if model is None or tokenizer is None:
        from hub import load_model

        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    if not isinstance(sae, SAE):
        sae = load_sae(sae, device=next(model.parameters()).device)
    layer = sae_layer(sae)
    if layer is None:
        raise ConfigError(f"the SAE in {identity['folder']} names no residual-stream layer in its metadata")
    harvester = Harvester(model, layer)
    check_d_in(sae.d_in, harvester.d_in, identity["folder"])
    sequences = fast_sequences(conversations, tokenizer, max_len=config.max_len)
    step = config.chunk_conversations
    spans = [(s, min(s + step, len(sequences))) for s in range(0, len(sequences), step)]
    pad_id = pad_token_id(tokenizer)
    specials = resolve_special_tokens(tokenizer)
    done = [store.chunk_path(folder, i).is_file() for i in range(len(spans))]
    total = sum(len(s) for s in sequences)
    initial = sum(len(s) for (a, b), d in zip(spans, done, strict=True) if d for s in sequences[a:b])
    started = time.perf_counter()
    bar = tqdm(
        total=total, initial=initial, unit="tok", unit_scale=True, desc="collect", disable=not progress
    )
    with bar:
        for i, (a, b) in enumerate(spans):
            if done[i]:
                continue
            chunk = encode_chunk(
                harvester, sae, sequences[a:b], pad_id, config, specials.mask, on_tokens=bar.update
            )
            store.write_atomic(store.chunk_path(folder, i), chunk)
            if on_chunk is not None:
                on_chunk(i)
    seconds = time.perf_counter() - started
    stats = store.build_index(folder, len(spans), sae.d_sae, config.histogram_bins, config.skip_first)
    vocab = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])).tolist()
    strings = tokenizer.batch_decode([[t] for t in vocab])
    store.write_json(folder / store.VOCAB, dict(zip(map(str, vocab), strings, strict=True)))
    new_tokens = total - initial
    manifest = {
        "format_version": store.FORMAT_VERSION,
        "key": folder.name,
        "sae": {
            **identity,
            "d_sae": sae.d_sae,
            "d_in": sae.d_in,
            "architecture": sae.cfg.architecture,
            "layer": layer,
        },
        "data": {
            "sources": [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)],
            "sha256": data_sha,
            "conversations": len(conversations),
            "instances_requested": config.instances,
        },
        "model": {"ref": config.model, "name_or_path": str(model.config.name_or_path)},
        "settings": asdict(config),
        "stats": {
            **stats,
            "collect_seconds": seconds,
            "tokens_per_s": new_tokens / seconds if new_tokens and seconds > 0 else None,
        },
    }
    store.write_json(folder / store.MANIFEST, manifest)
    store.remove_chunks(folder)
    return Collection.open(folder, sae=identity)


def encode_chunk(
    harvester: Harvester,
    sae: SAE,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    config: CollectConfig,
    special_mask: Callable[[Sequence[int]], torch.Tensor],
    on_tokens: Callable[[int], Any] | None = None,
) -> dict[str, np.ndarray]:
    """The token ids, special-token marks and CSR SAE code of `sequences` (one chunk, in order)."""
    first = 1 if config.skip_first else 0
    pieces: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for batch in bucket_batches(sequences, config.token_budget, pad_id, seed=None):
        resids = harvester.per_sequence(batch)
        lengths = [len(r) - first for r in resids]
        with torch.no_grad():
            code = sae.encode(torch.cat([r[first:] for r in resids]).to(sae.device, sae.dtype))
        rows, cols = (code > 0).nonzero(as_tuple=True)
        values = code[rows, cols].to(torch.float16).cpu().numpy()
        rows, cols = rows.cpu().numpy(), cols.cpu().numpy().astype(np.int32)
        bounds = np.searchsorted(rows, np.cumsum([0, *lengths]))
        row_starts = np.cumsum([0, *lengths])
        for j, index in enumerate(batch.indices):
            lo, hi = bounds[j], bounds[j + 1]
            counts = np.bincount(rows[lo:hi] - row_starts[j] + first, minlength=len(resids[j]))
            pieces[index] = (counts, cols[lo:hi], values[lo:hi])
        if on_tokens is not None:
            on_tokens(batch.n_tokens)
    order = range(len(sequences))
    token_ids = np.concatenate([np.asarray(sequences[i], dtype=np.int32) for i in order])
    special = np.concatenate([special_mask(sequences[i]).numpy() for i in order])
    counts = np.concatenate([pieces[i][0] for i in order])
    return {
        "token_ids": token_ids,
        "special": special.astype(np.uint8),
        "offsets": np.cumsum([0, *(len(sequences[i]) for i in order)]).astype(np.int64),
        "indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "features": np.concatenate([pieces[i][1] for i in order]),
        "values": np.concatenate([pieces[i][2] for i in order]),
    }

"""Harvested activations on disk: `fast-steer harvest` writes them once, `train --activations` reads them.

Layout of a cache folder (outside the repo; safetensors and JSON only):

    shard_00000.safetensors   activations [n, d_in] (the chosen dtype), token_ids [n] int32,
                              sequence [n] int64 (index of the sequence in harvest order), position [n] int32
    ...
    harvest.json              written last: the run config that produced it, the model, the dtype the
                              model ran in (`model_dtype`, resolved: never auto), the device and library
                              versions, the stream's provenance and statistics, and the shards with
                              their token counts

Every real token is stored (position 0 included) in the order the stream harvests them (one epoch, no
mixing), so the first-token rule, MSE_st and token-type reports still work on the cache.
`CachedActivationStream` reads the shards back through the same mixing buffer as the live stream: epochs
visit the shards in a seeded order, rank r of `world_size` takes every `world_size`-th shard, exclusions
(`exclude_first_token`, `max_norm_multiple`) apply when reading, and `state_dict()` resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hub import describe_device, library_versions, resolve_dtype
from steer.errors import ConfigError, MissingFileError, OutputExistsError
from steer.positions import SINK_POSITION
from steer.sae import dtype_from_name, dtype_name
from train.activations import ActivationStream, stream_statistics
from train.buffer import BufferedStream, MixingBuffer, check_identity
from train.harvest import drop_norm_outliers
from train.run_config import RunConfig

MANIFEST = "harvest.json"
FORMAT_VERSION = 1
CACHE_DTYPES = ("float32", "bfloat16", "float16")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def write_cache(
    stream: ActivationStream,
    out_dir: str | Path,
    *,
    model_source: str,
    dtype: str = "float32",
    max_tokens: int | None = None,
    shard_tokens: int = 262_144,
    progress: bool = True,
) -> dict[str, Any]:
    """Harvest one epoch of `stream`'s batches (or the first `max_tokens` real tokens) into `out_dir`."""
    if dtype not in CACHE_DTYPES:
        raise ConfigError(f"cache dtype {dtype!r}; expected one of {', '.join(CACHE_DTYPES)}")
    if shard_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise ConfigError("shard_tokens and max_tokens must be positive")
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise OutputExistsError(f"{out} already holds a harvest ({MANIFEST}); choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = dtype_from_name(dtype)
    parts: dict[str, list[torch.Tensor]] = {
        "activations": [],
        "token_ids": [],
        "sequence": [],
        "position": [],
    }
    shards: list[dict[str, Any]] = []
    stats = {"real_tokens": 0, "padded_tokens": 0, "sequences": 0, "forward_batches": 0}

    def flush() -> None:
        if not parts["activations"]:
            return
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        name = shard_name(len(shards))
        save_file(tensors, str(out / (name + ".tmp")))
        (out / (name + ".tmp")).replace(out / name)
        shards.append({"file": name, "tokens": len(tensors["token_ids"])})
        for v in parts.values():
            v.clear()

    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="harvest", disable=not progress)
    pending = 0
    for batch in stream.epoch_batches(0):
        h = stream.harvester.residuals(batch)
        keep = batch.attention_mask.bool()
        positions = torch.arange(keep.shape[1]).expand_as(keep)
        sequences = stats["sequences"] + torch.arange(keep.shape[0])[:, None].expand_as(keep)
        parts["activations"].append(h[keep.to(h.device)].to("cpu", torch_dtype))
        parts["token_ids"].append(batch.input_ids[keep].to(torch.int32))
        parts["sequence"].append(sequences[keep].to(torch.int64))
        parts["position"].append(positions[keep].to(torch.int32))
        stats["real_tokens"] += batch.n_tokens
        stats["padded_tokens"] += batch.n_padded
        stats["sequences"] += len(batch.lengths)
        stats["forward_batches"] += 1
        pending += batch.n_tokens
        bar.update(batch.n_tokens)
        if pending >= shard_tokens:
            flush()
            pending = 0
        if max_tokens is not None and stats["real_tokens"] >= max_tokens:
            break
    flush()
    bar.close()
    if not shards:
        raise ConfigError("the stream produced no tokens to harvest")
    manifest = {
        "format_version": FORMAT_VERSION,
        "run": stream.run.to_dict(),
        "model_source": model_source,
        "layer": stream.layer,
        "d_in": stream.d_in,
        "dtype": dtype,
        "model_dtype": dtype_name(stream.harvester.dtype),
        "device": describe_device(stream.harvester.device),
        "versions": library_versions(),
        "provenance": stream.description(),
        "stats": stream_statistics(stats),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise MissingFileError(f"{folder} is not a harvested activation folder (no {MANIFEST})")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


def harvest_dtype(manifest: dict[str, Any]) -> str | None:
    """The dtype the model ran in while harvesting (caches written before `model_dtype` was recorded name
    it in their provenance); None if neither says."""
    return manifest.get("model_dtype") or manifest.get("provenance", {}).get("dtype")


def harvest_summary(manifest: dict[str, Any]) -> str:
    """One line of what a cache's manifest says about how it was computed: model dtype, device, versions
    (`not recorded` for what a cache written before they were recorded lacks)."""
    versions = manifest.get("versions")
    return "; ".join(
        (
            f"model in {harvest_dtype(manifest) or 'a dtype not recorded'}",
            f"device {manifest.get('device', 'not recorded')}",
            f"stored as {manifest['dtype']}",
            ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else "versions not recorded",
        )
    )


def check_harvest_dtype(folder: Path, manifest: dict[str, Any], requested: str) -> None:
    """Refuse a cache harvested in another model dtype than `requested` (`auto` takes the cache's)."""
    cached = harvest_dtype(manifest)
    if requested == "auto" or cached is None:
        return
    wanted = resolve_dtype(requested)
    if cached != wanted:
        raise ConfigError(
            f"{folder} was harvested with the model in {cached}, but {wanted} is requested now: activations of "
            f"two dtypes would mix. Request {cached} (--dtype {cached}, or auto) to use this cache, or harvest "
            f"a new one in {wanted} into another folder"
        )


class CachedActivationStream(BufferedStream):
    """Yields float32 [batch_size / world_size, d_in] batches read from a harvested cache; resumable."""

    releases_pages_at_refill = False  # no model runs here: the steps keep reusing their own freed pages

    def __init__(self, run: RunConfig, rank: int = 0, world_size: int = 1, chunk_tokens: int | None = None):
        self.folder = Path(run.data.activations)
        self.manifest = read_manifest(self.folder)
        self.cache_sha256 = hashlib.sha256((self.folder / MANIFEST).read_bytes()).hexdigest()
        harvested = RunConfig.from_dict(self.manifest["run"])
        mismatched = {
            name: (theirs, ours)
            for name, theirs, ours in (
                ("layer", harvested.layer, run.layer),
                ("method", harvested.data.method, run.data.method),
                ("model", harvested.model, run.model),
            )
            if theirs != ours
        }
        if mismatched:
            listed = ", ".join(f"{k}: cache {a!r} vs run {b!r}" for k, (a, b) in mismatched.items())
            raise ConfigError(f"{self.folder} was harvested with other settings ({listed})")
        check_harvest_dtype(self.folder, self.manifest, run.model_dtype)
        shards = self.manifest["shards"]
        if len(shards) < world_size:
            raise ConfigError(
                f"{self.folder} has {len(shards)} shards, fewer than the {world_size} processes"
            )
        self.run, self.settings, self.rank, self.world_size = run, run.stream, rank, world_size
        self.layer, self.seed = run.layer, run.data.seed
        self.d_in = int(self.manifest["d_in"])
        self.batch_size = run.training.local_batch_size(world_size)
        self.chunk_tokens = chunk_tokens or max(1, run.stream.buffer_tokens // 2)
        self.model_source = self.manifest["model_source"]
        self.buffer = MixingBuffer(run.stream.buffer_tokens, self.d_in, seed=self.seed * 1009 + rank)
        self.epoch, self.shard_pos, self.offset = 0, 0, 0
        self.tail = torch.empty(0, self.d_in)
        self.stats: dict[str, int] = dict.fromkeys(
            ("tokens_yielded", "tokens_harvested", "real_tokens", "excluded_first", "excluded_norm",
             "dropped_tokens", "cache_tokens_read"),
            0,
        )  # fmt: skip
        self._epoch_start_read = 0

    def shard_order(self, epoch: int) -> list[int]:
        """Shard indices this rank reads in `epoch` (a seeded permutation, every world_size-th)."""
        order = list(range(len(self.manifest["shards"])))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[self.rank :: self.world_size]

    def _fill(self) -> None:
        order = self.shard_order(self.epoch)
        if self.shard_pos >= len(order):
            if self.stats["tokens_harvested"] == self._epoch_start_read:
                raise ConfigError(f"a whole epoch of {self.folder} yielded no activations (all excluded?)")
            self.epoch, self.shard_pos, self.offset = self.epoch + 1, 0, 0
            self._epoch_start_read = self.stats["tokens_harvested"]
            if self.settings.max_epochs is not None and self.epoch >= self.settings.max_epochs:
                self._finish()
            return
        shard = self.manifest["shards"][order[self.shard_pos]]
        end = min(self.offset + self.chunk_tokens, shard["tokens"])
        with safe_open(str(self.folder / shard["file"]), framework="pt") as fh:
            x = fh.get_slice("activations")[self.offset : end].float()
            position = fh.get_slice("position")[self.offset : end]
        self.stats["cache_tokens_read"] += end - self.offset
        self.stats["real_tokens"] += end - self.offset
        if self.settings.exclude_first_token:
            first = position == SINK_POSITION
            self.stats["excluded_first"] += int(first.sum())
            x = x[~first]
        x, n_norm = drop_norm_outliers(x, self.settings.max_norm_multiple)
        self.stats["excluded_norm"] += n_norm
        self.buffer.push(x)
        self.stats["tokens_harvested"] += len(x)
        self.offset = end
        if self.offset >= shard["tokens"]:
            self.shard_pos, self.offset = self.shard_pos + 1, 0

    # -- state ---------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "cache_sha256": self.cache_sha256,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "chunk_tokens": self.chunk_tokens,
            "buffer_tokens": self.settings.buffer_tokens,
            "exclude_first_token": self.settings.exclude_first_token,
            "max_norm_multiple": self.settings.max_norm_multiple,
            "max_epochs": self.settings.max_epochs,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self._identity(),
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "offset": self.offset,
            "epoch_start_read": self._epoch_start_read,
            **self._buffer_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_identity(state["config"], self._identity(), "cached activation stream")
        self.epoch, self.shard_pos, self.offset = (
            int(state["epoch"]),
            int(state["shard_pos"]),
            int(state["offset"]),
        )
        self._epoch_start_read = int(state["epoch_start_read"])
        self._load_buffer_state(state)

    def provenance(self) -> dict[str, Any]:
        """The harvest's provenance, plus what training read from the cache."""
        harvest_stats = self.manifest["stats"]
        return {
            **self.manifest["provenance"],
            "activations": str(self.folder),
            "activations_dtype": self.manifest["dtype"],
            "harvest_padding_share": harvest_stats["padding_share"],
            "sequences": harvest_stats["sequences"],
            "world_size": self.world_size,
            "epochs_started": self.epoch + 1,
            **stream_statistics({**self.stats, "padded_tokens": self.stats["real_tokens"]}),
        }

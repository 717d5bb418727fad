"""The activation stream: corpus -> sequences -> length-bucketed batches -> harvest -> mixing buffer -> tensors.

Public API:
    ActivationStream(model, tokenizer, corpus, run: RunConfig, rank=None, world_size=None)
        iter / next / .next_batch() -> float32 [batch_size / world_size, d_in]
        .tokens_yielded, .stats, .epoch, .d_in, .shard_indices(epoch)
        .sample_batches(n_tokens) -> list[Batch]   (what the stream would harvest first; for benchmarks)
        .state_dict() -> flat dict of torch.Tensor and JSON-able values;  .load_state_dict(state)
        .provenance() -> what the SAE's cfg.json metadata records of the data seen so far (call after training)

The settings come from the run's `data`, `stream` and `training.batch_size` (`train.run_config`).

Each epoch visits the corpus in a seeded permutation; rank r of `world_size` takes every
`world_size`-th item of it, so data-parallel processes harvest disjoint data (shards differ by at most
one record: keep `max_epochs=None` and stop on a token count, so every rank takes the same steps).
The rank's items are processed in pools of `pool_size`: a pool is tokenised, or its ids read back from the token cache
(`train.token_cache`; FAST: one conversation per sequence; BT(F)/BT(P):
concatenated into `block_len` blocks, the remainder carried into the next pool), length-bucketed into
batches of at most `token_budget` padded tokens, and the batch order is shuffled. Harvested residuals go
into the mixing buffer, which hands out shuffled rows. The stream is infinite (a new permutation per
epoch) unless `max_epochs` is set; then the buffer is flushed at the end and a final remainder smaller
than `batch_size` is dropped and counted in `stats["dropped_tokens"]`.

The position (epoch, pool, batch within pool, BT carry), the buffer contents and its generator state are
all in `state_dict()`, so a resumed run yields exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steer.errors import ConfigError
from steer.hooks import input_device
from steer.positions import pad_token_id
from train.buffer import BufferedStream, MixingBuffer, check_identity
from train.compiled import resolve_compile
from train.data import Corpus, content_hash
from train.harvest import Harvester
from train.run_config import RunConfig
from train.sequences import (
    METHOD_LABELS,
    Batch,
    bucket_batches,
    chat_template_sha256,
    pack_blocks,
    truncated,
)
from train.token_cache import default_token_cache, tokenise


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def context_length(model: torch.nn.Module) -> int | None:
    """The model's number of positions (`max_position_embeddings` / `n_positions`), if its config says."""
    text_cfg = model.config.get_text_config()
    return getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)


DEFAULT_MAX_LEN = 8192


def default_max_len(model: torch.nn.Module) -> int:
    """FAST truncation when none is given: 8,192 tokens, or the model's context if shorter."""
    return min(DEFAULT_MAX_LEN, context_length(model) or DEFAULT_MAX_LEN)


class ActivationStream(BufferedStream):
    """Yields float32 [batch_size / world_size, d_in] residual batches; resumable through `state_dict()`."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        corpus: Corpus,
        run: RunConfig,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        dist_rank, dist_world = _distributed_rank()
        self.rank = dist_rank if rank is None else rank
        self.world_size = dist_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={self.rank} world_size={self.world_size}"
            )
        self.run, self.settings = run, run.stream
        self.layer, self.method, self.seed = run.layer, run.data.method, run.data.seed
        self.batch_size = run.training.local_batch_size(self.world_size)
        self.max_len = run.stream.max_len or default_max_len(model)
        expected_kind = "text" if self.method == "bt-p" else "chat"
        if corpus.kind != expected_kind:
            raise ConfigError(
                f"method {self.method!r} needs a {expected_kind} corpus "
                f"(load_{'texts' if expected_kind == 'text' else 'conversations'}), got a {corpus.kind} corpus"
            )
        if len(corpus) < self.world_size:
            raise ConfigError(f"corpus has {len(corpus)} records, fewer than world_size={self.world_size}")
        seq_len = self.max_len if self.method == "fast" else self.settings.block_len
        max_pos = context_length(model)
        if max_pos is not None and seq_len > max_pos:
            name = "max_len" if self.method == "fast" else "block_len"
            raise ConfigError(f"{name}={seq_len} exceeds the model's {max_pos} positions")
        self.model, self.tokenizer, self.corpus = model, tokenizer, corpus
        self.pad_id = pad_token_id(tokenizer)
        self.token_cache = default_token_cache()  # pools tokenised before are read back (`train.token_cache`)
        self.harvester = Harvester(
            model,
            self.layer,
            exclude_first_token=self.settings.exclude_first_token,
            max_norm_multiple=self.settings.max_norm_multiple,
            compile=resolve_compile(run.compile, input_device(model), run.training.total_tokens),
        )
        self.d_in = self.harvester.d_in
        self.buffer = MixingBuffer(self.settings.buffer_tokens, self.d_in, seed=self.seed * 1009 + self.rank)
        # position
        self.epoch, self.pool, self.batch_pos = 0, 0, 0
        self.carry_in: list[int] = []
        self.tail = torch.empty(0, self.d_in)
        self.stats: dict[str, int] = dict.fromkeys(
            ("tokens_yielded", "tokens_harvested", "real_tokens", "padded_tokens", "excluded_first",
             "excluded_norm", "sequences", "forward_batches", "dropped_tokens"),
            0,
        )  # fmt: skip
        # caches, rebuilt from the position
        self._order: tuple[int, list[int]] | None = None
        self._batches: list[Batch] | None = None
        self._carry_out: list[int] = []
        self._epoch_start_harvested = 0

    # ------------------------------------------------------------ iteration

    def shard_indices(self, epoch: int) -> list[int]:
        """Corpus indices this rank visits in `epoch`, in order (a seeded permutation, every world_size-th)."""
        order = list(range(len(self.corpus)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[self.rank :: self.world_size]

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.shard_indices(self.epoch))
        return self._order[1]

    def _pool_batches(self, epoch: int, pool: int, carry_in: list[int]) -> tuple[list[Batch], list[int]]:
        """The bucketed batches of one pool and the BT remainder carried to the next pool."""
        cfg = self.settings
        order = self._epoch_order() if epoch == self.epoch else self.shard_indices(epoch)
        items = [self.corpus[i] for i in order[pool * cfg.pool_size : (pool + 1) * cfg.pool_size]]
        kind = "text" if self.method == "bt-p" else "chat"
        token_lists = (self.token_cache.token_lists if self.token_cache else tokenise)(
            kind, items, self.tokenizer
        )
        if self.method == "fast":
            sequences, carry_out = truncated(token_lists, self.max_len), []
        else:
            sequences, carry_out = pack_blocks(token_lists, cfg.block_len, carry_in)
        batches = bucket_batches(
            sequences, cfg.token_budget, self.pad_id, f"{self.seed}:{epoch}:{pool}", cfg.width_multiple
        )
        return batches, carry_out

    def _build_pool(self) -> list[Batch]:
        batches, self._carry_out = self._pool_batches(self.epoch, self.pool, self.carry_in)
        return batches

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """Every token batch of `epoch`, in the order the stream harvests them (harvests nothing itself)."""
        carry: list[int] = []
        n_pools = -(-len(self.shard_indices(epoch)) // self.settings.pool_size)
        for pool in range(n_pools):
            batches, carry = self._pool_batches(epoch, pool, carry)
            yield from batches

    def sample_batches(self, n_tokens: int) -> list[Batch]:
        """The first token batches of epoch 0 until `n_tokens` real tokens (for benchmarks)."""
        out: list[Batch] = []
        total = 0
        for batch in self.epoch_batches(0):
            if total >= n_tokens:
                break
            out.append(batch)
            total += batch.n_tokens
        return out

    def _next_pool(self) -> None:
        self.pool, self.batch_pos, self.carry_in = self.pool + 1, 0, self._carry_out
        self._batches = None
        if self.pool * self.settings.pool_size >= len(self._epoch_order()):
            if self.stats["tokens_harvested"] == self._epoch_start_harvested:
                raise ConfigError(
                    f"a whole epoch produced no activations: the corpus ({len(self.corpus)} records) is too small "
                    f"for block_len={self.settings.block_len} or everything was excluded"
                )
            self.epoch, self.pool = self.epoch + 1, 0
            self._epoch_start_harvested = self.stats["tokens_harvested"]
            if self.settings.max_epochs is not None and self.epoch >= self.settings.max_epochs:
                self._finish()

    def _fill(self) -> None:
        """Harvest one batch into the buffer (moving to the next pool / epoch as needed)."""
        if self._batches is None:
            self._batches = self._build_pool()
        if self.batch_pos >= len(self._batches):
            self._next_pool()
            return
        batch = self._batches[self.batch_pos]
        self.batch_pos += 1
        if self.quota is not None:  # the last fill harvests only the rows the quota still needs
            batch = batch.head(self._rows_needed(batch, self.quota - self.tokens_yielded - len(self.buffer)))
        self.buffer.push(self.harvester(batch))
        s, last = self.stats, self.harvester.last_stats
        s["tokens_harvested"] += last["kept"]
        s["real_tokens"] += last["real"]
        s["padded_tokens"] += last["padded"]
        s["excluded_first"] += last["excluded_first"]
        s["excluded_norm"] += last["excluded_norm"]
        s["sequences"] += len(batch.lengths)
        s["forward_batches"] += 1

    def _rows_needed(self, batch: Batch, tokens: int) -> int:
        """How many of `batch`'s first rows give `tokens` activations (position 0 counted out where excluded;
        should norm outliers leave it short, the next batch makes up the rest)."""
        first = int(self.settings.exclude_first_token)
        total = 0
        for rows, length in enumerate(batch.lengths, start=1):
            total += length - first
            if total >= tokens:
                return rows
        return len(batch.lengths)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Flat dict: torch.Tensor values (save with safetensors) and JSON-able values (save as JSON)."""
        return {
            "config": self._identity(),
            "epoch": self.epoch,
            "pool": self.pool,
            "batch_pos": self.batch_pos,
            "epoch_start_harvested": self._epoch_start_harvested,
            "carry_in": torch.tensor(self.carry_in, dtype=torch.long),
            **self._buffer_state(),
        }

    def _identity(self) -> dict[str, Any]:
        """What a saved state must match to be loaded into this stream."""
        return {
            "layer": self.layer,
            "method": self.method,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            **asdict(self.settings),
            "max_len": self.max_len,
            "corpus_size": len(self.corpus),
            "corpus_fingerprint": self._corpus_fingerprint(),
        }

    def _corpus_fingerprint(self) -> str:
        """sha256 over the content hashes of up to 64 evenly spaced records (cheap check of the same data)."""
        n = len(self.corpus)
        picks = sorted({i * n // 64 for i in range(64)})
        return hashlib.sha256("".join(content_hash(self.corpus[i]) for i in picks).encode()).hexdigest()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (taken from a stream with the same config and corpus)."""
        check_identity(state["config"], self._identity(), "activation stream")
        self.epoch, self.pool, self.batch_pos = (
            int(state["epoch"]),
            int(state["pool"]),
            int(state["batch_pos"]),
        )
        self._epoch_start_harvested = int(state["epoch_start_harvested"])
        self.carry_in = [int(t) for t in state["carry_in"].tolist()]
        self._load_buffer_state(state)
        self._batches = None

    # ------------------------------------------------------------ provenance

    def provenance(self) -> dict[str, Any]:
        """What the SAE's metadata records of this stream: its `description` and the statistics of the data
        seen so far (call it after training)."""
        return {**self.description(), "epochs_started": self.epoch + 1, **stream_statistics(self.stats)}

    def description(self) -> dict[str, Any]:
        """What the stream reads and how: method, data, dtype, template hash, special ids, lengths."""
        tok = self.tokenizer
        return {
            "method": METHOD_LABELS[self.method],
            "method_id": self.method,
            "data": list(self.corpus.sources),
            "data_split": self.corpus.split,
            "data_records": len(self.corpus),
            "data_skipped_records": len(self.corpus.problems),
            "dtype": str(self.harvester.dtype).removeprefix("torch."),
            "compiled": self.harvester.compiled is not None,
            "chat_template_sha256": chat_template_sha256(tok),
            "special_token_ids": {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens},
            "pad_token_id": self.pad_id,
            "context_size": self.max_len if self.method == "fast" else self.settings.block_len,
            "world_size": self.world_size,
        }


def stream_statistics(stats: dict[str, int]) -> dict[str, Any]:
    """The counters of a stream plus its padding share (0 when nothing was padded)."""
    padded = stats.get("padded_tokens", 0)
    share = 1 - stats.get("real_tokens", 0) / padded if padded else 0.0
    return {**stats, "padding_share": share}

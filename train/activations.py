"""The activation stream: corpus -> sequences -> length-bucketed batches -> harvest -> mixing buffer -> tensors.

Public API:
    StreamConfig (dataclass: layer, method, batch_size, buffer_tokens, token_budget, max_len, block_len,
                  pool_size, exclude_first_token, max_norm_multiple, seed, max_epochs, rank, world_size)
    ActivationStream(model, tokenizer, corpus, config)
        iter / next / .next_batch() -> float32 [batch_size, d_in]
        .tokens_yielded, .stats, .epoch, .d_in, .shard_indices(epoch)
        .sample_batches(n_tokens) -> list[Batch]   (what the stream would harvest first; for benchmarks)
        .state_dict() -> flat dict of torch.Tensor and JSON-able values;  .load_state_dict(state)
        .describe() -> provenance dict for the SAE's cfg.json metadata

Each epoch visits the corpus in a seeded permutation; rank r of `world_size` takes every
`world_size`-th item of it, so data-parallel processes harvest disjoint data (shards differ by at most
one record: keep `max_epochs=None` and stop on a token count, so every rank takes the same steps).
The rank's items are processed in pools of `pool_size`: a pool is tokenised (FAST: one conversation per sequence; BT(F)/BT(P):
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
import json
import random
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from train.buffer import MixingBuffer
from train.data import Corpus, content_hash
from train.harvest import Harvester, hook_name
from train.memory import release_free_memory
from train.sequences import (
    METHOD_LABELS,
    Batch,
    bucket_batches,
    check_method,
    fast_sequences,
    pack_blocks,
    render_conversations,
    text_token_lists,
)

# Fields that must match for a saved state to be loaded into a stream.
_STATE_FIELDS = (
    "layer", "method", "batch_size", "buffer_tokens", "token_budget", "max_len", "block_len",
    "pool_size", "exclude_first_token", "max_norm_multiple", "seed", "max_epochs", "rank", "world_size",
)  # fmt: skip


@dataclass
class StreamConfig:
    """How activations are produced; `rank`/`world_size` None means torch.distributed's (or 0/1)."""

    layer: int
    method: str = "fast"
    batch_size: int = 4096
    buffer_tokens: int = 65536
    token_budget: int = 4096
    max_len: int = 8192
    block_len: int = 2048
    pool_size: int = 2048
    exclude_first_token: bool = False
    max_norm_multiple: float | None = None
    seed: int = 0
    max_epochs: int | None = None
    rank: int | None = None
    world_size: int | None = None

    def validate(self) -> None:
        check_method(self.method)
        for name in ("batch_size", "buffer_tokens", "token_budget", "max_len", "block_len", "pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.buffer_tokens < 2 * self.batch_size:
            raise ValueError(
                f"buffer_tokens ({self.buffer_tokens}) must be at least 2 x batch_size ({self.batch_size}): "
                "the buffer hands out half of itself between refills"
            )
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"max_epochs must be positive or None, got {self.max_epochs}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={self.rank} world_size={self.world_size}"
            )


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def chat_template_sha256(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """sha256 of the tokenizer's chat template (JSON for a dict of templates), None if it has none."""
    template = tokenizer.chat_template
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def context_length(model: torch.nn.Module) -> int | None:
    """The model's number of positions (`max_position_embeddings` / `n_positions`), if its config says."""
    text_cfg = model.config.get_text_config()
    return getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None)


def default_max_len(model: torch.nn.Module) -> int:
    """FAST truncation when none is given: 8,192 tokens, or the model's context if shorter."""
    return min(StreamConfig.max_len, context_length(model) or StreamConfig.max_len)


class ActivationStream:
    """Yields float32 [batch_size, d_in] residual batches; resumable through `state_dict()`."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        corpus: Corpus,
        config: StreamConfig,
    ):
        rank, world_size = _distributed_rank()
        config = replace(config)
        config.rank = rank if config.rank is None else config.rank
        config.world_size = world_size if config.world_size is None else config.world_size
        config.validate()
        expected_kind = "text" if config.method == "bt-p" else "chat"
        if corpus.kind != expected_kind:
            raise ValueError(
                f"method {config.method!r} needs a {expected_kind} corpus "
                f"(load_{'texts' if expected_kind == 'text' else 'conversations'}), got a {corpus.kind} corpus"
            )
        if len(corpus) < config.world_size:
            raise ValueError(f"corpus has {len(corpus)} records, fewer than world_size={config.world_size}")
        seq_len = config.max_len if config.method == "fast" else config.block_len
        max_pos = context_length(model)
        if max_pos is not None and seq_len > max_pos:
            name = "max_len" if config.method == "fast" else "block_len"
            raise ValueError(f"{name}={seq_len} exceeds the model's {max_pos} positions")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")
        self.model, self.tokenizer, self.corpus, self.config = model, tokenizer, corpus, config
        self.pad_id = pad_id
        self.harvester = Harvester(
            model,
            config.layer,
            exclude_first_token=config.exclude_first_token,
            max_norm_multiple=config.max_norm_multiple,
        )
        self.d_in = self.harvester.d_in
        self.buffer = MixingBuffer(config.buffer_tokens, self.d_in, seed=config.seed * 1009 + config.rank)
        # position
        self.epoch, self.pool, self.batch_pos = 0, 0, 0
        self.carry_in: list[int] = []
        self.exhausted = False
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

    @property
    def tokens_yielded(self) -> int:
        return self.stats["tokens_yielded"]

    def __iter__(self) -> ActivationStream:
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    def next_batch(self) -> torch.Tensor:
        """The next float32 [batch_size, d_in] tensor; StopIteration after `max_epochs`."""
        n = self.config.batch_size
        while not self.exhausted and not self.buffer.can_pop(n):
            self._harvest_next()
        if not self.exhausted:
            out = self.buffer.pop(n)
        else:
            if len(self.tail) < n:
                self.stats["dropped_tokens"] += len(self.tail)
                self.tail = self.tail[:0]
                raise StopIteration
            out, self.tail = self.tail[:n], self.tail[n:]
        self.stats["tokens_yielded"] += n
        return out

    def shard_indices(self, epoch: int) -> list[int]:
        """Corpus indices this rank visits in `epoch`, in order (a seeded permutation, every world_size-th)."""
        order = list(range(len(self.corpus)))
        random.Random(f"{self.config.seed}:{epoch}").shuffle(order)
        return order[self.config.rank :: self.config.world_size]

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.shard_indices(self.epoch))
        return self._order[1]

    def _pool_batches(self, epoch: int, pool: int, carry_in: list[int]) -> tuple[list[Batch], list[int]]:
        """The bucketed batches of one pool and the BT remainder carried to the next pool."""
        cfg = self.config
        order = self._epoch_order() if epoch == self.epoch else self.shard_indices(epoch)
        items = [self.corpus[i] for i in order[pool * cfg.pool_size : (pool + 1) * cfg.pool_size]]
        if cfg.method == "fast":
            sequences, carry_out = fast_sequences(items, self.tokenizer, cfg.max_len), []
        else:
            token_lists = (
                render_conversations(self.tokenizer, items)
                if cfg.method == "bt-f"
                else text_token_lists(items, self.tokenizer)
            )
            sequences, carry_out = pack_blocks(token_lists, cfg.block_len, carry_in)
        batches = bucket_batches(sequences, cfg.token_budget, self.pad_id, seed=f"{cfg.seed}:{epoch}:{pool}")
        return batches, carry_out

    def _build_pool(self) -> list[Batch]:
        batches, self._carry_out = self._pool_batches(self.epoch, self.pool, self.carry_in)
        return batches

    def sample_batches(self, n_tokens: int) -> list[Batch]:
        """The first token batches of epoch 0 (as the stream harvests them), until `n_tokens` real tokens.

        For benchmarks (`harvest_throughput`); harvests nothing and leaves the stream's position alone.
        """
        out: list[Batch] = []
        pool, carry, total = 0, [], 0
        n_pools = -(-len(self.shard_indices(0)) // self.config.pool_size)
        while total < n_tokens and pool < n_pools:
            batches, carry = self._pool_batches(0, pool, carry)
            for batch in batches:
                out.append(batch)
                total += batch.n_tokens
                if total >= n_tokens:
                    break
            pool += 1
        return out

    def _next_pool(self) -> None:
        self.pool, self.batch_pos, self.carry_in = self.pool + 1, 0, self._carry_out
        self._batches = None
        if self.pool * self.config.pool_size >= len(self._epoch_order()):
            if self.stats["tokens_harvested"] == self._epoch_start_harvested:
                raise ValueError(
                    f"a whole epoch produced no activations: the corpus ({len(self.corpus)} records) is too small "
                    f"for block_len={self.config.block_len} or everything was excluded"
                )
            self.epoch, self.pool = self.epoch + 1, 0
            self._epoch_start_harvested = self.stats["tokens_harvested"]
            if self.config.max_epochs is not None and self.epoch >= self.config.max_epochs:
                self.exhausted = True
                self.tail = self.buffer.flush()

    def _harvest_next(self) -> None:
        """Harvest one batch into the buffer (moving to the next pool / epoch as needed)."""
        if self._batches is None:
            self._batches = self._build_pool()
        if self.batch_pos >= len(self._batches):
            self._next_pool()
            return
        batch = self._batches[self.batch_pos]
        self.batch_pos += 1
        self.buffer.push(self.harvester(batch))
        release_free_memory()
        s, last = self.stats, self.harvester.last_stats
        s["tokens_harvested"] += last["kept"]
        s["real_tokens"] += last["real"]
        s["padded_tokens"] += last["padded"]
        s["excluded_first"] += last["excluded_first"]
        s["excluded_norm"] += last["excluded_norm"]
        s["sequences"] += len(batch.lengths)
        s["forward_batches"] += 1

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Flat dict: torch.Tensor values (save with safetensors) and JSON-able values (save as JSON)."""
        buf = self.buffer.state_dict()  # all tensors
        return {
            "config": {k: getattr(self.config, k) for k in _STATE_FIELDS},
            "corpus_size": len(self.corpus),
            "corpus_fingerprint": self._corpus_fingerprint(),
            "epoch": self.epoch,
            "pool": self.pool,
            "batch_pos": self.batch_pos,
            "exhausted": self.exhausted,
            "epoch_start_harvested": self._epoch_start_harvested,
            "stats": dict(self.stats),
            "carry_in": torch.tensor(self.carry_in, dtype=torch.long),
            "tail": self.tail.clone(),
            **{f"buffer_{k}": v for k, v in buf.items()},
        }

    def _corpus_fingerprint(self) -> str:
        """sha256 over the content hashes of up to 64 evenly spaced records (cheap check of the same data)."""
        n = len(self.corpus)
        picks = sorted({i * n // 64 for i in range(64)})
        return hashlib.sha256("".join(content_hash(self.corpus[i]) for i in picks).encode()).hexdigest()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (taken from a stream with the same config and corpus)."""
        mine = {k: getattr(self.config, k) for k in _STATE_FIELDS}
        diff = {k: (state["config"].get(k), v) for k, v in mine.items() if state["config"].get(k) != v}
        if state["corpus_size"] != len(self.corpus):
            diff["corpus_size"] = (state["corpus_size"], len(self.corpus))
        elif state["corpus_fingerprint"] != self._corpus_fingerprint():
            diff["corpus_fingerprint"] = (state["corpus_fingerprint"], self._corpus_fingerprint())
        if diff:
            listed = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"activation stream state does not match this stream ({listed})")
        self.epoch, self.pool, self.batch_pos = (
            int(state["epoch"]),
            int(state["pool"]),
            int(state["batch_pos"]),
        )
        self.exhausted = bool(state["exhausted"])
        self._epoch_start_harvested = int(state["epoch_start_harvested"])
        self.stats = {k: int(v) for k, v in state["stats"].items()}
        self.carry_in = [int(t) for t in state["carry_in"].tolist()]
        self.tail = state["tail"].to(torch.float32).clone()
        self.buffer.load_state_dict(
            {k.removeprefix("buffer_"): v for k, v in state.items() if k.startswith("buffer_")}
        )
        self._batches = None

    # ------------------------------------------------------------ provenance

    def describe(self) -> dict[str, Any]:
        """Provenance for SAE metadata: method, data, layer, hook, dtype, exclusions, lengths, template hash."""
        cfg, tok = self.config, self.tokenizer
        info: dict[str, Any] = {
            "method": METHOD_LABELS[cfg.method],
            "method_id": cfg.method,
            "data": list(self.corpus.sources),
            "data_split": self.corpus.split,
            "data_records": len(self.corpus),
            "data_skipped_records": len(self.corpus.problems),
            "layer": cfg.layer,
            "hook_name": hook_name(cfg.layer),
            "dtype": str(self.harvester.dtype).removeprefix("torch."),
            "exclude_first_token": cfg.exclude_first_token,
            "max_norm_multiple": cfg.max_norm_multiple,
            "chat_template_sha256": chat_template_sha256(tok),
            "special_token_ids": {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens},
            "pad_token_id": self.pad_id,
            "batch_size": cfg.batch_size,
            "buffer_tokens": cfg.buffer_tokens,
            "token_budget": cfg.token_budget,
            "seed": cfg.seed,
            "world_size": cfg.world_size,
            "epochs_started": self.epoch + 1,
            "padding_share": 1 - self.stats["real_tokens"] / max(self.stats["padded_tokens"], 1),
            **{k: v for k, v in self.stats.items()},
        }
        info["max_len" if cfg.method == "fast" else "block_len"] = (
            cfg.max_len if cfg.method == "fast" else cfg.block_len
        )
        return info

"""Token sequences for harvesting: FAST (one conversation per sequence) and block training (BT).

Public API:
    METHODS = ("fast", "bt-f", "bt-p");  METHOD_LABELS maps them to "FAST", "BT(F)", "BT(P)"
    render_conversation(tokenizer, conversation) -> list[int]
    render_conversations(tokenizer, conversations) -> list[list[int]]
    chat_template_sha256(tokenizer) -> str | None   (what an SAE's metadata and the token cache record)
    fast_sequences(conversations, tokenizer, max_len=8192) -> list[list[int]]
    truncated(token_lists, max_len) -> list[list[int]]   (FAST's truncation of ids already rendered)
    text_token_lists(texts, tokenizer) -> list[list[int]]
    token_ids(tokenizer, texts) -> list[list[int]]   (no special tokens added)
    pack_blocks(token_lists, block_len=2048, carry=None) -> (blocks, remainder)
    Batch (input_ids, attention_mask, lengths, indices)
    make_batch(sequences, pad_id, indices=None, width_multiple=1) -> Batch
    bucket_batches(sequences, token_budget, pad_id, seed=0, width_multiple=1) -> list[Batch]
        (seed: int | str | None)
    padded_width(longest, width_multiple=1) -> int

FAST renders each conversation with the tokenizer's own chat template and tokenises the rendered text
without adding special tokens (exactly what ``apply_chat_template(tokenize=True)`` produces), then
truncates at ``max_len``; two conversations never share a sequence. A template that has no system role and
raises on one (Gemma 2) gets the system message folded into the first user turn, as Gemma 3's own template
does (``steer.chat_template.template_messages``). BT(F) concatenates the same
templated conversations and cuts the stream into ``block_len`` blocks; BT(P) does the same with
pretraining documents, each followed by the eos token. Batches are right-padded: with a causal model
real tokens never attend to the padding on their right, and ``attention_mask`` marks the real tokens
whose residuals are kept.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from hub.formats import METHOD_LABELS
from steer.chat_template import template_messages
from steer.errors import ConfigError
from train.data import Conversation

METHODS = tuple(METHOD_LABELS)  # ("fast", "bt-f", "bt-p"), the one list every consumer imports


def check_method(method: str) -> str:
    """`method` if it is one of METHODS, else a ValueError naming the choices."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def _require_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not tokenizer.chat_template:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; FAST and BT(F) render conversations "
            "with the model's own template (use an instruct model, or BT(P) with pretraining text)"
        )


def chat_template_sha256(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """sha256 of the tokenizer's chat template (JSON for a dict of templates), None if it has none."""
    template = tokenizer.chat_template
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation]
) -> list[list[int]]:
    """Token ids of each conversation rendered with the tokenizer's chat template (no extra special tokens);
    system messages are folded into the first user turn where the template has no system role."""
    _require_template(tokenizer)
    if not conversations:
        return []
    texts = tokenizer.apply_chat_template(
        [template_messages(tokenizer, c) for c in conversations], tokenize=False
    )
    return token_ids(tokenizer, texts)


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids without added special tokens, as ``tokenizer(texts, add_special_tokens=False)``
    gives them. A fast tokenizer that encodes the plain way (no truncation, padding or special-token
    splitting set on its backend, no subclass encoding of its own) is read straight from the Rust backend
    without offsets, which makes tokenising a pool about 30% faster."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return [enc.ids for enc in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def render_conversation(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> list[int]:
    """Token ids of one conversation rendered with the tokenizer's chat template."""
    return render_conversations(tokenizer, [conversation])[0]


def fast_sequences(
    conversations: Sequence[Conversation], tokenizer: PreTrainedTokenizerBase, max_len: int = 8192
) -> list[list[int]]:
    """One sequence per conversation (FAST), truncated to `max_len` tokens."""
    return truncated(render_conversations(tokenizer, conversations), max_len)


def truncated(token_lists: Sequence[list[int]], max_len: int) -> list[list[int]]:
    """Each token list cut to its first `max_len` tokens (FAST's truncation)."""
    if max_len < 1:
        raise ConfigError(f"max_len must be positive, got {max_len}")
    return [ids[:max_len] for ids in token_lists]


def text_token_lists(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each pretraining text tokenised without special tokens and followed by the eos token (BT(P))."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("BT(P) separates documents with the eos token, but the tokenizer has none")
    if not texts:
        return []
    return [ids + [tokenizer.eos_token_id] for ids in token_ids(tokenizer, texts)]


def pack_blocks(
    token_lists: Sequence[Sequence[int]], block_len: int = 2048, carry: Sequence[int] | None = None
) -> tuple[list[list[int]], list[int]]:
    """Concatenate `carry` and `token_lists` and cut into `block_len` blocks; returns (blocks, remainder).

    The remainder (fewer than `block_len` tokens) is meant to be carried into the next call.
    """
    if block_len < 1:
        raise ConfigError(f"block_len must be positive, got {block_len}")
    stream = list(carry or [])
    for ids in token_lists:
        stream.extend(ids)
    n_full = len(stream) // block_len * block_len
    blocks = [stream[i : i + block_len] for i in range(0, n_full, block_len)]
    return blocks, stream[n_full:]


@dataclass
class Batch:
    """Right-padded token ids; `attention_mask` is 1 on real tokens. `indices` name the source sequences."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    indices: list[int]

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens."""
        return sum(self.lengths)

    @property
    def n_padded(self) -> int:
        """Tokens the forward pass computes, padding included."""
        return self.input_ids.numel()

    @property
    def padding_share(self) -> float:
        return 1.0 - self.n_tokens / self.n_padded if self.n_padded else 0.0

    def head(self, rows: int) -> Batch:
        """The first `rows` rows, at the same width (all of them when there are fewer)."""
        if rows >= len(self.lengths):
            return self
        return Batch(
            self.input_ids[:rows], self.attention_mask[:rows], self.lengths[:rows], self.indices[:rows]
        )


def padded_width(longest: int, width_multiple: int = 1) -> int:
    """`longest` rounded up to a multiple of `width_multiple`."""
    if width_multiple < 1:
        raise ValueError(f"width_multiple must be positive, got {width_multiple}")
    return -(-longest // width_multiple) * width_multiple


def make_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    indices: Sequence[int] | None = None,
    width_multiple: int = 1,
) -> Batch:
    """Right-pad `sequences` with `pad_id` into one Batch, its width the longest rounded up to a multiple
    of `width_multiple`."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("a batch needs at least one sequence and no empty sequences")
    lengths = [len(s) for s in sequences]
    width = padded_width(max(lengths), width_multiple)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return Batch(
        input_ids, mask, lengths, list(indices) if indices is not None else list(range(len(sequences)))
    )


def bucket_batches(
    sequences: Sequence[Sequence[int]],
    token_budget: int,
    pad_id: int,
    seed: int | str | None = 0,
    width_multiple: int = 1,
) -> list[Batch]:
    """Group sequences of similar length: rows x padded width <= `token_budget` (a longer sequence goes
    alone), the width being the longest row rounded up to a multiple of `width_multiple`.

    Sequences are sorted by length (longest first) and packed greedily; the order of the resulting
    batches is shuffled with `seed` (None keeps longest-first order). A width multiple of 16 makes batch
    shapes repeat, which keeps the CPU's per-shape kernel caches small (README, Speed).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    groups: list[list[int]] = []
    for i in order:
        longest = len(sequences[groups[-1][0]]) if groups else 0
        if groups and (len(groups[-1]) + 1) * padded_width(longest, width_multiple) <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    if seed is not None:
        random.Random(seed).shuffle(groups)
    return [make_batch([sequences[i] for i in g], pad_id, g, width_multiple) for g in groups]

"""Special-token positions of a chat template: which tokens they are, and where they occur.

`resolve_special_tokens(tokenizer)` renders the tokenizer's chat template with placeholder
messages (as a prompt and as a finished conversation) and reads off (a) the special tokens the
template emits (`<|im_start|>`, `<|im_end|>`, `<|start_header_id|>`, `<start_of_turn>`, `[INST]`,
`<|user|>`, ...; also added tokens not flagged special, e.g. Qwen3's `<think>` / `</think>`) and (b)
the token sequences of the role names that follow a special token (`user`, `ass` + `istant`, Gemma's
`model` for the assistant, ...). The result marks positions causally: a position is marked
iff its token is special, or it continues an unbroken run of role-name tokens right after a
special token. Because the rule only looks backwards, the mask of a whole sequence equals the
mask produced chunk by chunk with the state carried over (`SpecialTokens.advance`, which the steering
runtime runs across KV-cache steps).

Also here, as the two token-position rules every consumer shares: `SINK_POSITION` / `without_sink` (position 0
left out of residual statistics) and `pad_token_id` (which id pads a batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from steer.errors import ConfigError

# The names a template may spell each role with after its special token (Gemma calls the assistant `model`).
ROLE_NAMES = {"system": ("system",), "user": ("user",), "assistant": ("assistant", "model")}
_PLACEHOLDER = "Hello there"
_MAX_ROLE_TOKENS = 8

# Trie node ids of the position automaton.
OUTSIDE = 0  # not in a special run
_ROOT = 1  # just read a special token


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of a chat template and the role-name token sequences that follow them.

    `special_ids`: ids that are always marked. `roles`: (role, token ids) pairs, e.g.
    `("assistant", (520, 9531))`. `names`: (id, token string) for every id that can be marked.
    """

    special_ids: tuple[int, ...]
    roles: tuple[tuple[str, tuple[int, ...]], ...]
    names: tuple[tuple[int, str], ...]

    # -- the automaton --------------------------------------------------------------------
    @cached_property
    def transitions(self) -> dict[tuple[int, int], int]:
        """Role-sequence trie edges `(node, token) -> child`, rooted at `_ROOT` (other moves: see `step`)."""
        children: dict[tuple[int, int], int] = {}
        n_nodes = 2
        for _, seq in self.roles:
            node = _ROOT
            for tok in seq:
                if (node, tok) not in children:
                    children[(node, tok)] = n_nodes
                    n_nodes += 1
                node = children[(node, tok)]
        return children

    @cached_property
    def _special_set(self) -> frozenset[int]:
        return frozenset(self.special_ids)

    def step(self, state: int, token: int) -> int:
        """The automaton's next state after reading `token` (`OUTSIDE` = not marked)."""
        if token in self._special_set:
            return _ROOT
        return self.transitions.get((state, token), OUTSIDE)

    def advance(self, state: int, tokens: Sequence[int], real: Sequence[bool] | None = None) -> list[int]:
        """The automaton's state after each of `tokens`, starting from `state` (marked: state != OUTSIDE).

        Where `real` is False (padding) the state carries over unchanged and the position is not marked.
        """
        step = self.step
        out = []
        for t, token in enumerate(tokens):
            if real is None or real[t]:
                state = step(state, token)
            out.append(state)
        return out

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bool mask `[B, T]` (or `[T]` for 1-D input) of special and role-name positions.

        Positions where `attention_mask` is 0 (padding) are never marked and do not break a run.
        """
        ids = torch.as_tensor(input_ids)
        squeeze = ids.ndim == 1
        if squeeze:
            ids = ids.unsqueeze(0)
            attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).unsqueeze(0)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [T] or [B, T], got shape {tuple(ids.shape)}")
        real = None if attention_mask is None else torch.as_tensor(attention_mask).bool().tolist()
        marks = []
        for row, tokens in enumerate(ids.tolist()):
            row_real = None if real is None else real[row]
            marks.append(marked(self.advance(OUTSIDE, tokens, row_real), row_real))
        out = torch.tensor(marks, dtype=torch.bool, device=ids.device).view(ids.shape)
        return out[0] if squeeze else out

    def labels(self, ids: Sequence[int] | torch.Tensor) -> list[str | None]:
        """Token type of each position of one sequence: the token string where marked, else None."""
        seq = torch.as_tensor(ids).reshape(-1)
        names = dict(self.names)
        marked = self.mask(seq).tolist()
        return [names.get(tok) if hit else None for tok, hit in zip(seq.tolist(), marked, strict=True)]

    def role_of(self, ids: Sequence[int]) -> str | None:
        """The role whose name tokens are exactly `ids`, if any."""
        return next((role for role, seq in self.roles if seq == tuple(ids)), None)

    def subset(self, special_ids: Sequence[int], roles: Sequence[str]) -> SpecialTokens:
        """The same automaton restricted to some of the special ids and role names."""
        keep_roles = tuple((role, seq) for role, seq in self.roles if role in roles)
        ids = tuple(i for i in self.special_ids if i in special_ids)
        marked_ids = set(ids) | {tok for _, seq in keep_roles for tok in seq}
        return SpecialTokens(ids, keep_roles, tuple((i, n) for i, n in self.names if i in marked_ids))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpecialTokens:
        """The automaton `to_dict` described (sent to processes that have no tokenizer, e.g. vLLM workers)."""
        roles = tuple((role, tuple(seq)) for role, seq in data["roles"].items())
        names = dict(zip(data["special_ids"], data["special_tokens"], strict=True))
        for role, seq in roles:
            names.update(zip(seq, data["role_tokens"][role], strict=True))
        return cls(tuple(data["special_ids"]), roles, tuple(names.items()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for SAE metadata and reports)."""
        names = dict(self.names)
        return {
            "special_ids": list(self.special_ids),
            "special_tokens": [names[i] for i in self.special_ids],
            "roles": {role: list(seq) for role, seq in self.roles},
            "role_tokens": {role: [names[i] for i in seq] for role, seq in self.roles},
        }


class MarkedSequence:
    """The marks of one growing sequence by absolute position: the automaton runs once over each position, so
    marks stay right however the sequence is fed (in chunks, from a cached prefix, recomputed after eviction)."""

    def __init__(self, special: SpecialTokens) -> None:
        self.special = special
        self.states: list[int] = []  # the automaton's state after each position seen so far

    def marks(
        self, positions: Sequence[int], tokens: Sequence[int], token_at: Callable[[int], int]
    ) -> list[bool]:
        """Whether each of `positions` (fed `tokens` now) is marked; the tokens of positions before them that
        were never fed here (a cached prefix) are read with `token_at(position)`."""
        fed = dict(zip(positions, tokens, strict=True))
        state = self.states[-1] if self.states else OUTSIDE
        for position in range(len(self.states), max(positions, default=-1) + 1):
            token = fed[position] if position in fed else token_at(position)
            state = self.special.step(state, token)
            self.states.append(state)
        return [self.states[p] != OUTSIDE for p in positions]


def marked(states: Sequence[int], real: Sequence[bool] | None = None) -> list[bool]:
    """Which positions are marked, given the automaton state after each (padding never is)."""
    if real is None:
        return [state != OUTSIDE for state in states]
    return [is_real and state != OUTSIDE for state, is_real in zip(states, real, strict=True)]


def resolve_special_tokens(
    tokenizer: PreTrainedTokenizerBase, extra: Sequence[str | int] = ()
) -> SpecialTokens:
    """Resolve the chat template's special tokens and role-name sequences from `tokenizer`.

    `extra`: further tokens (token strings or ids) to treat as special, e.g. `"Ċ"` or `198`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat_template; special-token positions are read from the chat template "
            "(use positions='all' or an explicit token list for base models)"
        )
    specials = _special_id_set(tokenizer)
    rendered = _render_placeholder_chats(tokenizer)
    special_ids: set[int] = set()
    roles: dict[str, tuple[int, ...]] = {}
    for ids in rendered:
        for i, tok in enumerate(ids):
            if tok not in specials:
                continue
            special_ids.add(tok)
            role, seq = _role_after(tokenizer, ids[i + 1 : i + 1 + _MAX_ROLE_TOKENS], specials)
            if role is not None:
                roles.setdefault(role, seq)
    special_ids.update(token_ids(tokenizer, extra))
    if not special_ids:
        raise ConfigError("the chat template renders no special tokens; cannot resolve special positions")
    marked = sorted(special_ids | {tok for seq in roles.values() for tok in seq})
    names = tuple(zip(marked, tokenizer.convert_ids_to_tokens(marked), strict=True))
    return SpecialTokens(
        special_ids=tuple(sorted(special_ids)),
        roles=tuple(sorted(roles.items())),
        names=names,
    )


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str | int]) -> list[int]:
    """Ids of `tokens`, each a token id, a vocabulary token string (`"Ċ"`) or text that is one token."""
    out = []
    vocab_size = len(tokenizer)
    for item in tokens:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ConfigError(f"a token must be a string or an int id, got {item!r}")
        if isinstance(item, int):
            if not 0 <= item < vocab_size:
                raise ConfigError(f"token id {item} is outside the tokenizer's vocabulary [0, {vocab_size})")
            out.append(item)
            continue
        vocab_id = tokenizer.convert_tokens_to_ids(item)
        if vocab_id is not None and vocab_id != tokenizer.unk_token_id:
            out.append(int(vocab_id))
            continue
        encoded = tokenizer.encode(item, add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(
                f"token {item!r} is not a single token of this tokenizer (it encodes to "
                f"{tokenizer.convert_ids_to_tokens(encoded)}); give a vocabulary token or an id"
            )
        out.append(encoded[0])
    return out


# Position 0 holds the attention sink: its residual norm is ~100x the rest on SmolLM2, so residual statistics
# (the strength scale, feature discovery, evaluation after position 0) and, when asked, training leave it out.
SINK_POSITION = 0


def without_sink(mask: torch.Tensor) -> torch.Tensor:
    """A copy of the boolean mask `mask` (positions on its last axis) with the attention sink unmarked."""
    out = mask.clone()
    if out.shape[-1] > SINK_POSITION:
        out[..., SINK_POSITION] = False
    return out


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its eos token (as `hub.load_model` sets)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token to pad batches with; "
            "set tokenizer.pad_token"
        )
    return int(pad)


def _special_id_set(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Special and added tokens: those a rendered placeholder chat holds are the template's own tokens
    (added tokens not flagged special count too: Qwen3's `<think>` / `</think>`)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(tokenizer.added_tokens_decoder)
    return ids


def _render_placeholder_chats(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of the template rendered with placeholder conversations: prompts with and without a system
    message, and a finished conversation (the training form, which may hold other tokens, e.g. `<think>`)."""
    turns = [{"role": role, "content": _PLACEHOLDER} for role in ("user", "assistant", "user")]
    conversations = [
        ([{"role": "system", "content": _PLACEHOLDER}, *turns], True),
        (turns, True),
        (turns[:2], False),
    ]
    rendered, errors = [], []
    for conv, prompt in conversations:
        try:
            out = tokenizer.apply_chat_template(
                conv, add_generation_prompt=prompt, tokenize=True, return_dict=True
            )
        except Exception as exc:  # noqa: BLE001 - templates reject some roles (e.g. no system); try the next
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        rendered.append(list(out["input_ids"]))
    if not rendered:
        raise ConfigError(
            "could not render the chat template with placeholder messages: " + "; ".join(errors)
        )
    return rendered


def _role_after(
    tokenizer: PreTrainedTokenizerBase, following: list[int], specials: set[int]
) -> tuple[str | None, tuple[int, ...]]:
    """The role name spelled by the shortest token prefix of `following`, if any."""
    for k in range(1, len(following) + 1):
        if following[k - 1] in specials:
            break
        text = tokenizer.decode(following[:k]).lstrip()
        match = next((role for role, names in ROLE_NAMES.items() if text.startswith(names)), None)
        if match is not None:
            return match, tuple(following[:k])
        if not any(name.startswith(text) for names in ROLE_NAMES.values() for name in names):
            break
    return None, ()

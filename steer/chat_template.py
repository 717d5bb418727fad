"""What a chat template does with turns, read from the tokenizer itself (no table of families).

`template_messages(tokenizer, messages)`: the messages as the template accepts them. A template with no system
role that raises on one (Gemma 2) gets the system message folded into the first user turn, as Gemma 3's own
template does; every consumer that renders a chat (`SteeredModel.chat`, training, the server, the demo) goes
through it.

`turn_opening_token(tokenizer)`: the special token that opens a user turn (ChatML `<|im_start|>`, Llama 3
`<|start_header_id|>`, Gemma `<start_of_turn>`, Mistral `[INST]`, Phi `<|user|>`): the anchor whose top
feature the steering experiments add (FAST paper, App. F).
"""

from __future__ import annotations

from collections.abc import Sequence

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from steer.errors import ConfigError
from steer.positions import SpecialTokens, resolve_special_tokens

Messages = list[dict[str, str]]

_ACCEPTS_SYSTEM: dict[str, bool] = {}  # chat template text -> whether it renders a system message


def accepts_system(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template renders a system message rather than raising (Gemma 2 raises)."""
    template = tokenizer.chat_template
    key = template if isinstance(template, str) else repr(template)
    if key not in _ACCEPTS_SYSTEM:
        probe = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False)
            _ACCEPTS_SYSTEM[key] = True
        except TemplateError:
            _ACCEPTS_SYSTEM[key] = False
    return _ACCEPTS_SYSTEM[key]


def fold_system(conversation: Sequence[dict[str, str]]) -> Messages:
    """`conversation` with a leading system message put before the first user turn's text (blank line
    between), as Gemma 3's template does; a system message not followed by a user turn becomes one."""
    conversation = list(conversation)
    if not conversation or conversation[0]["role"] != "system":
        return conversation
    system, rest = conversation[0]["content"], conversation[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def template_messages(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> Messages:
    """`messages` as the tokenizer's chat template accepts them: the system message folded into the first user
    turn where the template has no system role, else unchanged."""
    messages = list(messages)
    if messages and messages[0]["role"] == "system" and not accepts_system(tokenizer):
        return fold_system(messages)
    return messages


_PROBES = ("Hello there", "Goodbye now")  # two user turns that differ from their first token on


def turn_opening_token(tokenizer: PreTrainedTokenizerBase, specials: SpecialTokens | None = None) -> str:
    """The special token that opens a user turn, as a token string of `specials.labels`.

    Read from the template rendered with one user turn: the special token right before the `user` role name
    where the template spells one (ChatML, Llama 3, Gemma), else the last special token before the message
    text (Mistral `[INST]`, Phi `<|user|>`). A `ConfigError` when the turn opens with no special token.
    """
    specials = specials or resolve_special_tokens(tokenizer)
    first, second = (
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                add_generation_prompt=False,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for text in _PROBES
    )
    start = next(
        (i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
        min(len(first), len(second)),
    )
    before = first[:start]  # the template's tokens up to the message text
    special = set(specials.special_ids)
    user = dict(specials.roles).get("user")
    at = [
        i
        for i, tok in enumerate(before)
        if tok in special and (user is None or tuple(before[i + 1 : i + 1 + len(user)]) == user)
    ]
    if not at:
        raise ConfigError(
            "the chat template opens a user turn with no special token (rendered: "
            f"{tokenizer.decode(before)!r} before the message), so it has no anchor token to choose a feature on; "
            "name the feature instead (--feature K)"
        )
    return dict(specials.names)[before[at[-1]]]

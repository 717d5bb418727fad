"""Chat histories as the panes hold them and as the model reads them."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from apps.demo.settings import DemoInputError
from steer.chat_template import template_messages

Conversation = list[dict[str, str]]


def steering_note(positions: int) -> dict:
    """The note the steered pane shows after a steered reply: how many positions the spec edited. It is a
    titled message (`metadata`), which `to_conversation` leaves out of what the model reads."""
    title = f"steered {positions} positions"
    return {"role": "assistant", "content": "", "metadata": {"title": title, "status": "done"}}


def _is_note(message: Any) -> bool:
    metadata = message.get("metadata") if isinstance(message, dict) else getattr(message, "metadata", None)
    return bool(metadata) and bool(
        metadata.get("title") if isinstance(metadata, dict) else getattr(metadata, "title", None)
    )


def message_text(content: Any) -> str:
    """The plain text of a Chatbot message's content (a string, or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def to_conversation(history: list | None) -> Conversation:
    """A pane's history (Chatbot messages) as `[{"role", "content"}]` with plain-text content (notes left out)."""
    out: Conversation = []
    for message in history or []:
        if _is_note(message):
            continue
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if role not in ("system", "user", "assistant"):
            raise DemoInputError(
                f"chat history has a message with role {role!r}; expected system, user or assistant"
            )
        out.append({"role": role, "content": message_text(content)})
    return out


def with_user_turn(history: Conversation, message: str, system_prompt: str = "") -> Conversation:
    """`history` plus the new user message, with `system_prompt` first when one is given."""
    convo = [m for m in history if m["role"] != "system"]
    if system_prompt.strip():
        convo = [{"role": "system", "content": system_prompt.strip()}, *convo]
    return [*convo, {"role": "user", "content": message}]


def conversation_ids(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, *, add_generation_prompt: bool
) -> list[int]:
    """The conversation's token ids in the chat template (a system message folded into the first user turn
    where the template has none, as in Gemma 2), with the assistant prompt when `add_generation_prompt`."""
    return list(
        tokenizer.apply_chat_template(
            template_messages(tokenizer, conversation),
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )

"""Stream one chat reply token by token from a (possibly steered) model running in a worker thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from steer.positions import pad_token_id


class _Cancelled(StoppingCriteria):
    """Stops `generate` at the next step once the consumer has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def stream_reply(
    generate: Callable[..., torch.Tensor],
    tokenizer,
    input_ids: torch.Tensor,
    gen_kwargs: dict,
    seed: int,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> Iterator[str]:
    """Yield the reply decoded so far after each new token; the last value is the whole reply.

    `generate` runs in a thread inside `context()` (e.g. a steering context) with the torch RNG
    seeded, so two calls with the same seed and settings sample alike. Closing the iterator early
    stops generation at the next token and waits for the thread to finish.
    """
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    cancel = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with context():
                torch.manual_seed(seed)
                generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                    pad_token_id=pad_token_id(tokenizer),
                    **gen_kwargs,
                )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer below
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, name="demo-generate", daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        cancel.set()
        thread.join()
    if failure:
        raise failure[0]

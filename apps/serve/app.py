"""The FastAPI app: OpenAI-compatible endpoints over the batching engine, steered per request.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /v1/saes (with labels),
GET /v1/saes/{name}/features?q=TEXT&limit=N (search by label), GET / PUT /v1/steering, GET /health. Every refusal is an OpenAI-shaped error (400 bad request,
401 no key, 404 unknown model, 429 full queue).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from apps.serve.auth import Gate
from apps.serve.engine import Engine, QueueFull
from apps.serve.errors import APIError, install_error_handlers
from apps.serve.labels import search_features
from apps.serve.responses import Choice, ResponseFormat, sse
from apps.serve.rows import Delta, Event, Failure, Finish, Row
from apps.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    Limits,
    SteeringUpdate,
)
from apps.serve.steering import Steering
from steer import SteeredModel

DISCONNECT_POLL_S = 0.25  # how often a request that does not stream checks that its client is still there


@dataclass
class Service:
    """What the endpoints serve: the model, its named SAEs and default spec, the engine and the limits."""

    sm: SteeredModel
    steering: Steering
    engine: Engine
    limits: Limits
    model_name: str
    api_key: str | None = None


def build_app(service: Service) -> FastAPI:
    """The app for `service` (its engine must be started; `serve` and `BackgroundServer` do that)."""
    app = FastAPI(title="fast-steer", summary="OpenAI-compatible chat server with SAE feature steering")
    install_error_handlers(app)
    app.add_middleware(Gate, api_key=service.api_key, max_body_bytes=service.limits.max_body_bytes)
    tokenizer = service.sm.tokenizer

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name, **service.engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "fast-steer"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/saes")
    async def saes() -> dict[str, Any]:
        return {"object": "list", "data": [s.describe() for s in service.steering.saes.values()]}

    @app.get("/v1/saes/{name}/features")
    def search(name: str, q: str = "", limit: str | None = None) -> list[dict[str, Any]]:
        return search_features(service.steering.saes, name, q, limit, service.limits)

    @app.get("/v1/steering")
    async def get_steering() -> dict[str, Any]:
        return {"steering": service.steering.describe_default()}

    @app.put("/v1/steering")
    async def put_steering(update: SteeringUpdate) -> dict[str, Any]:
        service.steering.default = service.steering.parse(update.steering)
        return {"steering": service.steering.describe_default()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [m.as_template_message() for m in body.messages]
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
                "input_ids"
            ]
        except (TemplateError, ValueError) as exc:  # a template that refuses the conversation (roles, order)
            raise APIError.bad_request(
                f"the chat template refused these messages: {exc}", "messages"
            ) from None
        return await _complete(service, request, body, [list(ids)], "messages", body.n_logprobs(), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [list(tokenizer(p)["input_ids"]) for p in body.prompt]
        return await _complete(service, request, body, prompts, "prompt", body.logprobs, chat=False)

    return app


async def _complete(
    service: Service,
    request: Request,
    body: GenerationRequest,
    prompts: list[list[int]],
    prompt_param: str,
    n_logprobs: int | None,
    chat: bool,
):
    """Check a completion request, queue its rows (two per prompt with `compare`) and answer it."""
    if body.model != service.model_name:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; this server serves {service.model_name!r}",
            "model",
            "not_found_error",
            "model_not_found",
        )
    limit = service.limits.max_prompt_tokens
    for prompt in prompts:
        if len(prompt) > limit:
            raise APIError.bad_request(
                f"the prompt is {len(prompt)} tokens long; this server accepts at most {limit}", prompt_param
            )
    params = body.sampling(service.limits, n_logprobs)
    spec = service.steering.resolve(body.steering, body.steering_given)
    if body.compare and spec is None:
        raise APIError.bad_request(
            "compare: true needs a steering spec (in the request, or the server's default)", "compare"
        )
    variants = [("steered", spec), ("plain", None)] if body.compare else [(None, spec)]
    if len(prompts) * len(variants) > service.engine.max_batch:
        raise APIError.bad_request(
            f"this request needs {len(prompts) * len(variants)} rows; a batch holds {service.engine.max_batch}",
            prompt_param,
        )
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    choices, rows = [], []
    for prompt_index, prompt in enumerate(prompts):
        for label, row_spec in variants:
            index = len(rows)
            choices.append(Choice(index, label, prompt_index, len(prompt)))
            rows.append(Row(prompt, params, row_spec, _sink(loop, events, index)))
    try:
        service.engine.submit(rows)
    except QueueFull as exc:
        raise APIError(429, str(exc), None, "rate_limit_error", "queue_full") from None
    fmt = ResponseFormat(chat, service.model_name, n_logprobs is not None)
    steering = None if spec is None else list(spec.data)
    if body.stream:
        return StreamingResponse(
            _stream(fmt, choices, rows, events, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(request, choices, rows))
    try:
        async for index, event in _events(choices, events):
            if isinstance(event, Failure):
                raise APIError(500, event.message, None, "server_error")
            _apply(choices[index], event)
    finally:
        watcher.cancel()
        _cancel_unfinished(choices, rows)
    return fmt.body(choices, steering)


async def _cancel_on_disconnect(request: Request, choices: list[Choice], rows: list[Row]) -> None:
    """Cancel the rows of a request that does not stream once its client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    _cancel_unfinished(choices, rows)


async def _events(choices: list[Choice], events: asyncio.Queue) -> AsyncIterator[tuple[int, Event]]:
    """The rows' events until every row has finished (or one failed)."""
    while any(c.finish_reason is None for c in choices):
        index, event = await events.get()
        yield index, event
        if isinstance(event, Failure):
            return


async def _stream(
    fmt: ResponseFormat, choices: list[Choice], rows: list[Row], events: asyncio.Queue, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per row event, then usage (if asked) and [DONE]. A client that goes
    away closes this generator, which cancels its unfinished rows."""
    started = [False] * len(choices)
    try:
        async for index, event in _events(choices, events):
            choice = choices[index]
            if isinstance(event, Failure):
                yield sse({"error": {"message": event.message, "type": "server_error", "param": None}})
                return
            _apply(choice, event)
            text, entries = (event.text, list(event.logprobs)) if isinstance(event, Delta) else ("", [])
            yield fmt.chunk(choice, text, entries, not started[index])  # new text, or the finish
            started[index] = True
        if include_usage:
            yield fmt.usage_chunk(choices)
        yield sse("[DONE]")
    finally:
        _cancel_unfinished(choices, rows)


def _apply(choice: Choice, event: Event) -> None:
    if isinstance(event, Delta):
        choice.text += event.text
        choice.logprobs += event.logprobs
    elif isinstance(event, Finish):
        choice.finish_reason = event.reason
        choice.completion_tokens = event.completion_tokens


def _cancel_unfinished(choices: list[Choice], rows: list[Row]) -> None:
    for choice, row in zip(choices, rows, strict=True):
        if choice.finish_reason is None:
            row.cancel.set()


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    """A thread-safe callable that hands row `index`'s events to the request's queue on `loop`."""

    def put(event: Event) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(events.put_nowait, (index, event))

    return put

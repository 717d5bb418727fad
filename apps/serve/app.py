"""The FastAPI app: OpenAI-compatible endpoints over the batching engine, steered per request.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /v1/saes (with labels),
GET /v1/saes/{name}/features?q=TEXT&limit=N (search by label), GET / PUT /v1/steering (PUT needs
`--admin-key`), GET /health (503 with the reason while the engine is down); /docs, /redoc and
/openapi.json only with `--docs`. Every refusal is an OpenAI-shaped error naming what was wrong: 400 bad
request or a limit exceeded (`Limits`: edits per spec, specs per request, stop-string length, prompts,
messages, prompt tokens, prompt + max_tokens over the model's context), 401 no key, 403 no admin key,
404 unknown model, 413 body too large, 429 full queue, 500 a bug (an error id, never its text), 503 engine
down, 504 past `--request-timeout`. Counts are checked before anything is tokenised; spec compilation and
tokenisation run off the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError

from apps.serve.auth import Gate
from apps.serve.errors import APIError, install_error_handlers
from apps.serve.labels import search_features
from apps.serve.responses import Choice, ResponseFormat, sse
from apps.serve.rows import Delta, Event, Failure, Finish, Row
from apps.serve.sampling import SamplingParams
from apps.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    Limits,
    SteeringUpdate,
)
from apps.serve.steering import RowSpec, Steering
from apps.serve.supervised import EngineDown, QueueFull, SupervisedEngine
from steer import SteeredModel
from steer.chat_template import template_messages

DISCONNECT_POLL_S = 0.25  # how often a request that does not stream checks that its client is still there
FAILURE_CODES = {400: None, 500: "internal_error", 503: "engine_unavailable", 504: "request_timeout"}
_OFF_LOOP = threading.Lock()  # one job at a time: they share the tokenizer, which refuses concurrent borrows
T = TypeVar("T")


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a worker thread (tokenising, compiling a spec), so the event loop goes on serving."""

    def locked() -> T:
        with _OFF_LOOP:
            return fn(*args)

    return await asyncio.to_thread(locked)


@dataclass
class Service:
    """What the endpoints serve: the model, its named SAEs and default spec, the engine and the limits, and
    who may call (`apps.serve.auth`); `docs` serves /docs, /redoc and /openapi.json."""

    sm: SteeredModel
    steering: Steering
    engine: SupervisedEngine
    limits: Limits
    model_name: str
    api_key: str | None = None
    admin_key: str | None = None
    allow_hosts: tuple[str, ...] = ()
    docs: bool = False


def build_app(service: Service) -> FastAPI:
    """The app for `service` (its engine must be started; `serve` and `BackgroundServer` do that)."""
    docs = service.docs
    app = FastAPI(
        title="fast-steer",
        summary="OpenAI-compatible chat server with SAE feature steering",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    app.add_middleware(
        Gate,
        api_key=service.api_key,
        max_body_bytes=service.limits.max_body_bytes,
        admin_key=service.admin_key,
        allow_hosts=service.allow_hosts,
    )
    tokenizer = service.sm.tokenizer
    limits = service.limits

    def encode_chat(messages: list[dict[str, str]]) -> list[list[int]]:
        ids = tokenizer.apply_chat_template(
            template_messages(tokenizer, messages), add_generation_prompt=True, return_dict=True
        )["input_ids"]
        return [list(ids)]

    def encode_texts(texts: list[str]) -> list[list[int]]:
        return [list(tokenizer(text)["input_ids"]) for text in texts]

    @app.get("/health")
    async def health():
        stats = {"model": service.model_name, **service.engine.stats()}
        stats["compiled_spec_bytes"] = service.steering.cached_bytes
        down = service.engine.down
        if down is not None:
            return JSONResponse({"status": "unavailable", "reason": down, **stats}, status_code=503)
        return {"status": "ok", **stats}

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
    async def put_steering(update: SteeringUpdate) -> dict[str, Any]:  # the Gate checked the admin key
        service.steering.default = await _off_loop(service.steering.parse, update.steering)
        return {"steering": service.steering.describe_default()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        deadline = asyncio.get_running_loop().time() + limits.request_timeout
        if len(body.messages) > limits.max_messages:
            raise APIError.over_limit(
                "the number of messages",
                len(body.messages),
                limits.max_messages,
                "--max-messages",
                "messages",
            )
        n_logprobs = body.n_logprobs()
        params, spec = await _prepare(service, body, 1, n_logprobs, "messages")
        messages = [m.as_template_message() for m in body.messages]
        try:
            prompts = await _off_loop(encode_chat, messages)
        except (TemplateError, ValueError) as exc:  # a template that refuses the conversation (roles, order)
            raise APIError.bad_request(
                f"the chat template refused these messages: {exc}", "messages"
            ) from None
        return await _complete(service, request, body, prompts, params, spec, "messages", True, deadline)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        deadline = asyncio.get_running_loop().time() + limits.request_timeout
        if len(body.prompt) > limits.max_prompts:
            raise APIError.over_limit(
                "the number of prompts", len(body.prompt), limits.max_prompts, "--max-prompts", "prompt"
            )
        params, spec = await _prepare(service, body, len(body.prompt), body.logprobs, "prompt")
        prompts = await _off_loop(encode_texts, body.prompt)
        return await _complete(service, request, body, prompts, params, spec, "prompt", False, deadline)

    return app


async def _prepare(
    service: Service, body: GenerationRequest, n_prompts: int, n_logprobs: int | None, prompt_param: str
) -> tuple[SamplingParams, RowSpec | None]:
    """What a request asks for, checked before its prompts are tokenised: the model, the sampling settings,
    the steering (compiled off the event loop) and the number of rows."""
    if body.model != service.model_name:
        raise APIError(
            404,
            f"model {body.model!r} is not served here; this server serves {service.model_name!r}",
            "model",
            "not_found_error",
            "model_not_found",
        )
    params = body.sampling(service.limits, n_logprobs)
    spec = await _off_loop(service.steering.resolve, body.steering, body.steering_given)
    if body.compare and spec is None:
        raise APIError.bad_request(
            "compare: true needs a steering spec (in the request, or the server's default)", "compare"
        )
    n_rows = n_prompts * (2 if body.compare else 1)
    if n_rows > service.engine.max_batch:
        raise APIError.over_limit(
            "the number of rows this request needs",
            n_rows,
            service.engine.max_batch,
            "--max-batch",
            prompt_param,
        )
    return params, spec


def _check_lengths(
    service: Service,
    body: GenerationRequest,
    prompts: list[list[int]],
    params: SamplingParams,
    prompt_param: str,
) -> None:
    """400 for a prompt over `--max-prompt-tokens`, or one that with its new tokens overruns the model's context."""
    limit, context = service.limits.max_prompt_tokens, service.engine.context
    field = body.new_tokens(service.limits)[1]
    for prompt in prompts:
        if len(prompt) > limit:
            raise APIError.over_limit(
                "the prompt's length in tokens", len(prompt), limit, "--max-prompt-tokens", prompt_param
            )
        if context is not None and len(prompt) + params.max_new_tokens > context:
            raise APIError.bad_request(
                f"the prompt ({len(prompt)} tokens) plus {field} ({params.max_new_tokens}) needs "
                f"{len(prompt) + params.max_new_tokens} positions; the model's context is {context} positions",
                field,
            )


def _failure_error(failure: Failure) -> APIError:
    """A row's failure as its client is told it."""
    kind = "invalid_request_error" if failure.status < 500 else "server_error"
    return APIError(failure.status, failure.message, None, kind, FAILURE_CODES.get(failure.status))


async def _complete(
    service: Service,
    request: Request,
    body: GenerationRequest,
    prompts: list[list[int]],
    params: SamplingParams,
    spec: RowSpec | None,
    prompt_param: str,
    chat: bool,
    deadline: float,
):
    """Check a completion request's prompts, queue its rows (two per prompt with `compare`) and answer it."""
    _check_lengths(service, body, prompts, params, prompt_param)
    variants = [("steered", spec), ("plain", None)] if body.compare else [(None, spec)]
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
    except EngineDown as exc:
        raise APIError(503, str(exc), None, "server_error", "engine_unavailable") from None
    fmt = ResponseFormat(chat, service.model_name, params.logprobs is not None)
    steering = None if spec is None else list(spec.data)
    timeout = service.limits.request_timeout
    if body.stream:
        return StreamingResponse(
            _stream(fmt, choices, rows, _events(choices, events, deadline, timeout), body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    watcher = asyncio.create_task(_cancel_on_disconnect(request, choices, rows))
    try:
        async for index, event in _events(choices, events, deadline, timeout):
            if isinstance(event, Failure):
                raise _failure_error(event)
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


async def _events(
    choices: list[Choice], events: asyncio.Queue, deadline: float, timeout: float
) -> AsyncIterator[tuple[int, Event]]:
    """The rows' events until every row has finished, or one failed, or the request's `deadline` (loop time)
    passed (a 504 `Failure`)."""
    while any(c.finish_reason is None for c in choices):
        try:
            async with asyncio.timeout_at(deadline):
                index, event = await events.get()
        except TimeoutError:
            message = f"the request took longer than this server allows ({timeout:g} s, --request-timeout)"
            yield -1, Failure(message, 504)
            return
        yield index, event
        if isinstance(event, Failure):
            return


async def _stream(
    fmt: ResponseFormat,
    choices: list[Choice],
    rows: list[Row],
    events: AsyncIterator[tuple[int, Event]],
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per row event, then usage (if asked) and [DONE]; a failure or the
    deadline ends the stream with an error event. A client that goes away closes this generator, which
    cancels its unfinished rows."""
    started = [False] * len(choices)
    try:
        async for index, event in events:
            if isinstance(event, Failure):
                yield sse(_failure_error(event).body())
                return
            choice = choices[index]
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
        choice.steered_positions = event.steered_positions


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

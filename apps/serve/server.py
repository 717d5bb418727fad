"""Putting a service together and running it under uvicorn: in the foreground (`fast-steer serve`) or in a
background thread on a free port (tests, `fast-steer bench serve`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import uvicorn

from apps.serve.app import Service, build_app
from apps.serve.auth import check_bind
from apps.serve.engine import RESTART_DELAY, Engine, Fault, context_length
from apps.serve.errors import APIError
from apps.serve.schemas import Limits
from apps.serve.steering import NamedSAE, Steering
from apps.serve.vllm_engine import VllmEngine, VllmOptions, check_vllm_spec
from steer import SpecError, SteeredModel

DEFAULT_WINDOW = 0.01


@dataclass(frozen=True)
class VllmServe:
    """What `--engine vllm` needs beyond the app: the model vLLM loads (a folder or Hub id), its dtype and
    device, and vLLM's own settings."""

    model_path: str
    dtype: str = "float32"
    device: str = "cpu"
    options: VllmOptions = field(default_factory=VllmOptions)


def make_service(
    model,
    tokenizer,
    saes: list[NamedSAE],
    *,
    model_name: str,
    limits: Limits | None = None,
    window: float = DEFAULT_WINDOW,
    api_key: str | None = None,
    admin_key: str | None = None,
    allow_hosts: tuple[str, ...] = (),
    docs: bool = False,
    default_steering=None,
    fault: Fault | None = None,
    restart_delay: float = RESTART_DELAY,
    vllm: VllmServe | None = None,
) -> Service:
    """A service with its engine started; `default_steering` is a request-style `steering` value; `fault`
    and `restart_delay` go to the HF `Engine` (tests and the soak bench make rows fail with `fault`).

    `vllm`: run the rows on vLLM (`VllmEngine`) instead of HF `generate`; `model` then only checks specs
    (its weights may be on the meta device: `hub.load_model(..., weights=False)`)."""
    limits = limits or Limits()
    sm = SteeredModel(model, tokenizer)
    steering = Steering(sm, saes, limits, check_vllm_spec if vllm is not None else None)
    try:
        steering.default = steering.parse(default_steering)
    except APIError as exc:  # the operator's spec, not a client's request: a startup error
        raise SpecError(f"the default steering (--spec): {exc.message}") from exc
    if vllm is None:
        engine = Engine(
            sm,
            max_batch=limits.max_batch,
            max_queue=limits.max_queue,
            window=window,
            fault=fault,
            restart_delay=restart_delay,
        )
    else:
        engine = VllmEngine(
            vllm.model_path,
            tokenizer,
            saes,
            sm.special_tokens if tokenizer.chat_template else None,
            dtype=vllm.dtype,
            device=vllm.device,
            max_batch=limits.max_batch,
            max_queue=limits.max_queue,
            context=context_length(model, tokenizer),
            options=vllm.options,
            restart_delay=restart_delay,
        )
    engine.start()
    return Service(sm, steering, engine, limits, model_name, api_key, admin_key, tuple(allow_hosts), docs)


def serve(service: Service, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl+C)."""
    check_bind(host, service.api_key)
    try:
        uvicorn.run(build_app(service), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        service.engine.stop()


class BackgroundServer:
    """`with BackgroundServer(service) as server:` serves on 127.0.0.1 at a free port (`server.url`)."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0) -> None:
        check_bind(host, service.api_key)
        self.service = service
        config = uvicorn.Config(build_app(service), host=host, port=port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fast-steer-serve", daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        return self._server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """The base URL of the OpenAI API (`.../v1`)."""
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log above)")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.service.engine.stop()

"""Who may call the server: loopback-only binding without a key, bearer tokens compared in constant time,
and a cap on request body size, checked before any body is parsed."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apps.serve.errors import APIError
from steer.errors import ConfigError

OPEN_PATHS = ("/health",)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address to bind) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """A ValueError when `host` would expose the server to the network without an API key."""
    if not is_loopback(host) and not api_key:
        raise ConfigError(
            f"--host {host} accepts connections from other machines: give --api-key KEY (or set "
            "FAST_STEER_API_KEY) so that only clients sending 'Authorization: Bearer KEY' are served"
        )


class Gate:
    """ASGI middleware: 401 without the bearer key (when one is set), 400 for an oversize body (by its
    Content-Length, or counted as a chunked body arrives)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if b"content-length" in headers:
            await self.app(scope, receive, send)
            return
        messages, size = [], 0  # a chunked body: read it here, up to the cap, then hand it on
        while not messages or messages[-1].get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                await self._too_large("chunked").response()(scope, receive, send)
                return
            messages.append(message)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _too_large(self, what: str) -> APIError:
        return APIError.bad_request(
            f"the request body ({what}) is larger than this server accepts ({self.max_body_bytes} bytes)"
        )

    def _refusal(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        if self.key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the server was "
                    "started with",
                    kind="authentication_error",
                    code="invalid_api_key",
                )
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return self._too_large(f"{length.decode(errors='replace')} bytes")
        return None

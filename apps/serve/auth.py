"""Who may call the server, checked before any body is parsed: loopback-only binding without a key, the
`Host` header, bearer tokens compared in constant time, the admin key, and a cap on request body size.

`Host`: a server without `--api-key` answers only requests whose `Host` is a loopback name or address
(127.0.0.1, localhost, [::1], with or without the port) or a name given with `--allow-host`, so a web page
cannot reach it by DNS rebinding. With `--api-key`, the key guards every request (a rebinding page cannot
send it), so any `Host` is accepted unless `--allow-host` is given; then the same list applies.
`PUT /v1/steering` changes the default spec of every client: it needs `Authorization: Bearer ADMIN_KEY`
(`--admin-key`), and without an admin key it is disabled (403).
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apps.serve.errors import APIError
from steer.errors import ConfigError

OPEN_PATHS = ("/health",)
ADMIN_ROUTES = (("PUT", "/v1/steering"),)


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


def host_name(header: str) -> str:
    """The host of a `Host` header without its port, lower-case: `[::1]:8000` -> `::1`, `a.b:80` -> `a.b`."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.partition(":")[0]


def _bearer_is(headers: dict[bytes, bytes], key: bytes) -> bool:
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class Gate:
    """ASGI middleware: 400 for a `Host` not allowed, 401 without the bearer key (when one is set), 403 on an
    admin route without the admin key, 413 for an oversize body (by its Content-Length, or counted as a
    chunked body arrives)."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        admin_key: str | None = None,
        allow_hosts: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.admin_key = admin_key.encode() if admin_key else None
        self.max_body_bytes = max_body_bytes
        self.allow_hosts = frozenset(host_name(h) for h in allow_hosts)
        self.check_host = self.key is None or bool(allow_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope["method"], scope["path"], headers)
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
        return APIError(
            413,
            f"the request body ({what}) is larger than this server accepts ({self.max_body_bytes} bytes, "
            "--max-body-bytes)",
            code="limit_exceeded",
        )

    def _refusal(self, method: str, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if self.check_host and not (is_loopback(host_name(host)) or host_name(host) in self.allow_hosts):
            names = ", ".join(["127.0.0.1", "localhost", "[::1]", *sorted(self.allow_hosts)])
            return APIError(
                400,
                f"Host {host!r} is not served here: this server answers Host {names} (with any port); "
                "start it with --allow-host NAME to add a name",
                code="host_not_allowed",
            )
        if (method, path) in ADMIN_ROUTES:
            if self.admin_key is None:
                return APIError(
                    403,
                    f"{method} {path} is disabled: start the server with --admin-key KEY to allow it",
                    kind="permission_error",
                    code="admin_disabled",
                )
            if not _bearer_is(headers, self.admin_key):
                return APIError(
                    403,
                    f"{method} {path} needs the admin key: send 'Authorization: Bearer ADMIN_KEY' with the "
                    "--admin-key the server was started with",
                    kind="permission_error",
                    code="invalid_admin_key",
                )
        elif self.key is not None and path not in OPEN_PATHS and not _bearer_is(headers, self.key):
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

"""Who may open the page: anyone on this machine when it listens on loopback; elsewhere only people who log in
with `--auth USER:PASSWORD` (Gradio's login), as `serve` needs `--api-key` off loopback."""

from __future__ import annotations

from apps.serve.auth import is_loopback
from steer.errors import ConfigError

AUTH_ENV = "FAST_STEER_DEMO_AUTH"

Auth = tuple[str, str]


def parse_auth(text: str | None) -> Auth | None:
    """`(user, password)` of `USER:PASSWORD` (split at the first ':'), None when not given. The error never
    repeats the value, which holds a password."""
    if not text:
        return None
    user, colon, password = text.partition(":")
    if not colon:
        raise ConfigError("--auth must be USER:PASSWORD, got a value without ':'")
    if not user.strip() or not password:
        missing = "user name" if not user.strip() else "password"
        raise ConfigError(f"--auth must be USER:PASSWORD with both parts non-empty; the {missing} is empty")
    return user, password


def check_bind(host: str, auth: Auth | None) -> None:
    """A `ConfigError` when `host` would expose the page (and the model) to the network without a login."""
    if auth is None and not is_loopback(host):
        raise ConfigError(
            f"--host {host} accepts connections from other machines: give --auth USER:PASSWORD (or set "
            f"{AUTH_ENV}) so that only people who log in with it can use the model"
        )

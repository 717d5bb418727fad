"""Where fast-steer keeps converted models and other downloads (outside the repo)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

CACHE_ENV = "FAST_STEER_CACHE"
HUB_HOST = "huggingface.co"


def cache_dir() -> Path:
    """`$FAST_STEER_CACHE`, else `$XDG_CACHE_HOME/fast-steer`, else `~/.cache/fast-steer`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fast-steer"


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face Hub can be reached now, and why not if it cannot.

    Checked with one TCP connection (no retries), so an offline machine learns it in
    milliseconds instead of waiting for huggingface_hub's retry loop.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True, ""
    except OSError as exc:
        return False, f"cannot connect to {host}:443 ({exc})"

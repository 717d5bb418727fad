"""`fast-steer serve` in a child process, started as users start it: for `bench serve` and the tests, and for
the vLLM engine, which runs in its own environment (`.venv-vllm`) with its own Python."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from steer.errors import ConfigError, FastSteerError

START_TIMEOUT_S = 900.0  # longest wait for /health: vLLM on a 2-core CPU takes a minute or more to start
STOP_TIMEOUT_S = 120.0  # longest wait for a stopped server to exit before its process group is killed
OUTPUT_TAIL = 4000  # characters of the server's output quoted when it does not start
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
"""What a vLLM server on a small, shared CPU needs: 1 GiB of KV cache, OpenMP threads not bound to cores."""


VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"  # `make vllm-venv`


class ServerStartError(FastSteerError, RuntimeError):
    """The server exited, or did not answer `/health`, before it was up (the message quotes its output)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of `host` that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vllm_python(path: str | None) -> str:
    """The Python that runs a vLLM server: `path`, or this checkout's `.venv-vllm`; a clear error without one."""
    python = Path(path) if path else VLLM_PYTHON
    if not python.is_file():
        raise ConfigError(
            f"a vLLM server runs on the Python of a vLLM environment; {python} is not there: "
            f"run `make vllm-venv` (CPU), or give the Python of one (bench serve: --vllm-python)"
        )
    return str(python)


def vllm_cpu_env() -> dict[str, str]:
    """`VLLM_CPU_ENV`, each variable as this process's environment sets it where it does."""
    return {name: os.environ.get(name, value) for name, value in VLLM_CPU_ENV.items()}


@contextmanager
def serve_process(
    *options: str,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> Iterator[str]:
    """`python -m apps serve *options --port P` on a free port of 127.0.0.1: yields the base URL
    (`http://127.0.0.1:P`) once `/health` answers 200, and stops the server (and whatever it started) after.

    `python`: the interpreter of the environment the server runs in; `env`: variables added to this process's
    environment. The server's output goes to a temporary file; a `ServerStartError` quotes its end when the
    server exits first or is not up after `start_timeout` seconds."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [python, "-m", "apps", "serve", *options, "--port", str(port)]
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output:
        proc = subprocess.Popen(
            args,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: vLLM's engine processes go with it
        )
        try:
            _wait_up(proc, base, time.monotonic() + start_timeout, output)
            yield base
        finally:
            proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT_S)
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there
            proc.wait()


def _wait_up(proc: subprocess.Popen, base: str, deadline: float, output) -> None:
    while True:
        if proc.poll() is not None:
            problem = f"exited with code {proc.returncode}"
            break
        if time.monotonic() > deadline:
            problem = "did not answer /health in time"
            break
        try:
            if httpx.get(base + "/health", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    output.flush()
    output.seek(0)
    tail = output.read()[-OUTPUT_TAIL:]
    raise ServerStartError(f"the server ({' '.join(proc.args)}) {problem}; its output ends:\n{tail}")

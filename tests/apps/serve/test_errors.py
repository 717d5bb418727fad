"""The server's error handlers over real HTTP: a `FastSteerError` is a 400 with its message, any other
exception a 500 that shows only an error id, never the exception's text (its traceback is logged under the id)."""

from __future__ import annotations

import logging
import re
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from apps.serve.errors import install_error_handlers
from steer.errors import ConfigError

SECRET = "internal detail of a bug"


@pytest.fixture(scope="module")
def url():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/bad-input")
    async def bad_input():
        raise ConfigError("strength must be finite, got nan")

    @app.get("/bug")
    async def bug():
        raise KeyError(SECRET)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the test server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join()


def test_fast_steer_error_is_a_400_with_its_message(url):
    response = httpx.get(f"{url}/bad-input")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"] == "strength must be finite, got nan" and error["type"] == "invalid_request_error"


def test_other_exception_is_a_500_with_an_id_and_without_its_text(url, caplog):
    with caplog.at_level(logging.ERROR, logger="apps.serve"):
        response = httpx.get(f"{url}/bug")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "server log" in error["message"]
    assert SECRET not in response.text and "KeyError" not in response.text
    error_id = re.fullmatch(r"internal error, id ([0-9a-f]{32}) \(see the server log\)", error["message"])[1]
    (logged,) = [r for r in caplog.records if error_id in r.getMessage()]  # the traceback, under that id
    assert logged.exc_info[0] is KeyError and "GET /bug" in logged.getMessage()

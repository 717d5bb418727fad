"""The demo off loopback needs a login (`--auth USER:PASSWORD`), as `serve` needs an API key."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.cli.demo import demo_command

pytest.importorskip("gradio")
from apps.demo.access import AUTH_ENV, check_bind, parse_auth  # noqa: E402
from steer.errors import ConfigError  # noqa: E402


def test_parse_auth():
    assert parse_auth(None) is None and parse_auth("") is None
    assert parse_auth("ann:s3cret") == ("ann", "s3cret")
    assert parse_auth("ann:pa:ss") == ("ann", "pa:ss"), "split at the first ':'"
    for bad, why in (
        ("annsecret", "without ':'"),
        (":secret", "user name is empty"),
        ("ann:", "password is empty"),
    ):
        with pytest.raises(ConfigError, match=why) as caught:
            parse_auth(bad)
        assert "secret" not in str(caught.value), "the password is never repeated"


def test_check_bind():
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, None)
    check_bind("0.0.0.0", ("ann", "pw"))
    with pytest.raises(
        ConfigError,
        match=f"--host 0.0.0.0 accepts connections from other machines: give --auth USER:PASSWORD \\(or set {AUTH_ENV}\\)",
    ):
        check_bind("0.0.0.0", None)


def test_cli_refuses_before_loading_anything(tmp_path, monkeypatch):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    option = next(p for p in demo_command.params if p.name == "auth")
    assert option.envvar == AUTH_ENV
    missing = str(tmp_path / "missing")  # never read: the refusal comes first
    for command in (["demo", "--sae", missing], ["run", "--data", missing]):
        result = CliRunner().invoke(main, [*command, "--host", "0.0.0.0"])
        assert result.exit_code == 1 and "give --auth USER:PASSWORD" in result.output, result.output
    result = CliRunner().invoke(main, ["demo", "--sae", missing, "--host", "0.0.0.0", "--auth", "annpw"])
    assert result.exit_code == 1 and "--auth must be USER:PASSWORD" in result.output
    monkeypatch.setenv(AUTH_ENV, "ann:")
    result = CliRunner().invoke(main, ["demo", "--sae", missing, "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "the password is empty" in result.output
    monkeypatch.setenv(AUTH_ENV, "ann:pw")
    result = CliRunner().invoke(main, ["demo", "--sae", missing, "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "neither an existing folder" in result.output, "past the login check"


def test_launch_applies_the_login():
    """`launch_app` refuses a non-loopback bind without a login, and with one Gradio asks for it."""
    from types import SimpleNamespace

    import gradio as gr
    import httpx

    from apps.demo import DemoLimits, launch_app
    from tests.conftest import free_port

    backend = SimpleNamespace(limits=DemoLimits())  # launch_app reads only the limits
    with gr.Blocks() as app:
        gr.Markdown("a page")
    with pytest.raises(ConfigError, match="give --auth"):
        launch_app(app, backend, host="0.0.0.0", port=free_port(), prevent_thread_lock=True, quiet=True)
    launch_app(app, backend, port=free_port(), auth=("ann", "pw"), prevent_thread_lock=True, quiet=True)
    try:
        assert httpx.get(app.local_url + "config").status_code == 401
        assert (
            httpx.post(app.local_url + "login", data={"username": "ann", "password": "no"}).status_code == 400
        )
        with httpx.Client() as browser:
            assert (
                browser.post(app.local_url + "login", data={"username": "ann", "password": "pw"}).status_code
                == 200
            )
            assert browser.get(app.local_url + "config").status_code == 200
    finally:
        app.close()

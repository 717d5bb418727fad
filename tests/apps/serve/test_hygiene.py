"""Web hygiene over real HTTP: the Host allow-list of a keyless server (DNS rebinding), the admin key of
PUT /v1/steering, and /docs, /redoc and /openapi.json only when asked for."""

from __future__ import annotations

import httpx
import pytest

from tests.apps.serve.helpers import STRONG, serving, tiny_parts


@pytest.fixture(scope="module")
def tiny(chatml_tokenizer, tmp_path_factory):
    return tiny_parts(chatml_tokenizer, tmp_path_factory.mktemp("serve_hygiene"))


@pytest.fixture(scope="module")
def keyless(tiny):
    with serving(*tiny, allow_hosts=("steer.lan",)) as srv:
        yield srv


def _models(server, host: str, **headers: str) -> httpx.Response:
    return httpx.get(server.url + "/models", headers={"Host": host, **headers})


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost:8000", "[::1]:8000", "[::1]", "LOCALHOST", "steer.lan:80"]
)
def test_keyless_server_answers_loopback_and_allowed_hosts(keyless, host):
    assert _models(keyless, host).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "lan"])
def test_keyless_server_refuses_other_hosts(keyless, host):
    response = _models(keyless, host)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "host_not_allowed"
    assert repr(host) in error["message"] and "--allow-host" in error["message"]
    assert "steer.lan" in error["message"]
    assert httpx.get(keyless.url.removesuffix("/v1") + "/health", headers={"Host": host}).status_code == 400


def test_keyed_server_takes_any_host_with_the_key(tiny):
    with serving(*tiny, api_key="k") as server:
        assert _models(server, "steer.example.com", Authorization="Bearer k").status_code == 200
        assert _models(server, "steer.example.com").status_code == 401
    with serving(*tiny, api_key="k", allow_hosts=("steer.lan",)) as server:  # a list given: it applies
        assert _models(server, "steer.lan", Authorization="Bearer k").status_code == 200
        assert _models(server, "other.lan", Authorization="Bearer k").status_code == 400


def test_put_steering_is_disabled_without_an_admin_key(keyless):
    response = httpx.put(
        keyless.url + "/steering", json={"steering": STRONG}, headers={"Authorization": "Bearer x"}
    )
    error = response.json()["error"]
    assert (
        response.status_code == 403
        and error["code"] == "admin_disabled"
        and "--admin-key" in error["message"]
    )
    assert httpx.get(keyless.url + "/steering").json() == {"steering": None}


def test_put_steering_needs_the_admin_key(tiny):
    with serving(*tiny, api_key="user", admin_key="admin") as server:
        url = server.url + "/steering"
        for headers in ({}, {"Authorization": "Bearer user"}, {"Authorization": "Bearer wrong"}):
            response = httpx.put(url, json={"steering": STRONG}, headers=headers)
            assert response.status_code == 403 and response.json()["error"]["code"] == "invalid_admin_key"
        assert httpx.get(url, headers={"Authorization": "Bearer user"}).json() == {"steering": None}
        put = httpx.put(url, json={"steering": STRONG}, headers={"Authorization": "Bearer admin"})
        assert put.status_code == 200 and put.json()["steering"][0]["edits"] == STRONG["edits"]
        assert httpx.get(url, headers={"Authorization": "Bearer user"}).json() == put.json()


def test_docs_only_when_asked(tiny, keyless):
    base = keyless.url.removesuffix("/v1")
    for path in ("/docs", "/redoc", "/openapi.json"):
        response = httpx.get(base + path)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    with serving(*tiny, docs=True) as server:
        base = server.url.removesuffix("/v1")
        assert all(httpx.get(base + path).status_code == 200 for path in ("/docs", "/redoc", "/openapi.json"))
        assert "/v1/chat/completions" in httpx.get(base + "/openapi.json").json()["paths"]

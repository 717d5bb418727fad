"""Feature labels over real HTTP: `GET /v1/saes` lists them, `GET /v1/saes/{name}/features` searches them
(the `openai` client and plain httpx), the found feature steers a chat, and bad searches get OpenAI-shaped
errors."""

from __future__ import annotations

import httpx
import pytest

from apps.serve.loading import load_named_saes
from apps.serve.schemas import Limits
from apps.serve.server import BackgroundServer, make_service
from hub import save_sae
from tests.apps.serve.helpers import LAYER, MODEL, chat, client, tiny_parts
from tests.hub.label_factory import label_sae
from tests.steer.helpers import random_sae

MAX_QUERY = 40
MAX_LIMIT = 5


@pytest.fixture(scope="module")
def server(chatml_tokenizer, tmp_path_factory):
    """A server with `tiny` (labelled) and `plain` (no labels)."""
    root = tmp_path_factory.mktemp("serve_labels")
    model, tokenizer, labelled = tiny_parts(chatml_tokenizer, root)
    label_sae(labelled, root / "run")
    plain = random_sae(model.config.hidden_size, 32, seed=2)
    plain.cfg.metadata["hook_name"] = f"blocks.{LAYER}.hook_resid_post"
    plain_dir = save_sae(plain, root / "plain")
    saes = load_named_saes([f"tiny={labelled}", f"plain={plain_dir}"], model.device, model.config.hidden_size)
    limits = Limits(max_new_tokens=16, max_search_query_chars=MAX_QUERY, max_search_limit=MAX_LIMIT)
    with BackgroundServer(make_service(model, tokenizer, saes, model_name=MODEL, limits=limits)) as srv:
        yield srv


def _search(server, name: str, **params) -> httpx.Response:
    return httpx.get(f"{server.url}/saes/{name}/features", params=params)


def test_saes_list_their_labels(server):
    listing = client(server).get("/saes", cast_to=object)
    by_name = {s["id"]: s for s in listing["data"]}
    labels = by_name["tiny"]["labels"]
    assert labels["judge_model"] == "judge-a" and labels["scorer"] == "fast-paper"
    assert labels["judge_validated"] is None and labels["score_range"] == [1.0, 5.0]
    assert {"feature": 3, "label": "polite tone", "score": 5.0} in labels["features"]
    assert [f["feature"] for f in labels["features"]] == [3, 5, 7, 9]
    assert by_name["plain"]["labels"] is None, "an SAE without labels is listed as before, labels null"


def test_search_with_the_openai_client_then_steer_with_the_feature(server):
    cl = client(server)
    hits = cl.get(
        "/saes/tiny/features", cast_to=object, options={"params": {"q": "capital city", "limit": 3}}
    )
    assert hits[0] == {"feature": 5, "label": "capital city", "score": 4.0, "density": 0.004,
                       "match": hits[0]["match"], "neuronpedia_url": None}  # fmt: skip
    assert hits[0]["match"] > 0 and len(hits) <= 3
    steering = {"sae": "tiny", "layer": LAYER, "edits": [{"feature": hits[0]["feature"], "strength": 40.0}]}
    plain = chat(cl, "Name a city.").choices[0].message.content
    steered = chat(cl, "Name a city.", steering=steering)
    assert steered.model_extra["steering"][0]["edits"][0]["feature"] == 5, (
        "the response echoes the spec it ran"
    )
    assert steered.choices[0].message.content != plain, "the found feature steers the reply"


def test_search_over_plain_http(server):
    response = _search(server, "tiny", q="tone", limit=2)
    assert response.status_code == 200
    hits = response.json()
    assert [h["feature"] for h in hits] == [3, 7], (
        "'polite tone' (shorter) before 'tone of the system prompt'"
    )
    assert set(hits[0]) == {"feature", "label", "score", "density", "match", "neuronpedia_url"}
    assert hits[0]["match"] > hits[1]["match"] > 0
    assert [h["feature"] for h in _search(server, "tiny", q="code").json()] == [9]
    assert _search(server, "tiny", q="code").json()[0]["density"] is None, "an unknown density is null"


def test_empty_and_unmatched_searches_are_empty_lists(server):
    for params in ({"q": ""}, {}, {"q": "zebra"}, {"q": "?!"}):
        response = _search(server, "tiny", **params)
        assert response.status_code == 200 and response.json() == [], params
    assert _search(server, "plain", q="tone").json() == [], "an SAE without labels matches nothing"


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        ({"q": "x" * (MAX_QUERY + 1)}, "q", f"q is {MAX_QUERY + 1} characters long; this server accepts at most "
                                            f"{MAX_QUERY}"),
        ({"q": "tone", "limit": 0}, "limit", f"limit must be an integer from 1 to {MAX_LIMIT}, got '0'"),
        ({"q": "tone", "limit": MAX_LIMIT + 1}, "limit", f"from 1 to {MAX_LIMIT}, got '{MAX_LIMIT + 1}'"),
        ({"q": "tone", "limit": "many"}, "limit", "got 'many'"),
    ],
)  # fmt: skip
def test_out_of_range_searches_are_openai_shaped_400s(server, params, param, message):
    response = _search(server, "tiny", **params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"], error["message"]


def test_search_answers_only_for_loaded_saes(server):
    for name in ("nope", "..%2F..%2Fetc", "%2Ftmp%2Fsae"):
        response = httpx.get(f"{server.url}/saes/{name}/features", params={"q": "tone"})
        assert response.status_code == 404, name
        error = response.json()["error"]
        assert error["type"] == "not_found_error"
        if name == "nope":
            assert "no SAE named 'nope' is loaded here (loaded: plain, tiny)" in error["message"]

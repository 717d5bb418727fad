"""Neuronpedia links over real HTTP: an SAE whose cfg.json metadata has a `neuronpedia_id` (as a registered release
gets) lists its source in `GET /v1/saes` and a page per feature found by `GET /v1/saes/{name}/features`; an SAE
without one shows none. No network call is made for them."""

from __future__ import annotations

import httpx
import pytest

from apps.serve.loading import load_named_saes
from apps.serve.schemas import Limits
from apps.serve.server import BackgroundServer, make_service
from hub import sae_metadata, save_sae
from tests.apps.serve.helpers import LAYER, MODEL
from tests.conftest import build_tiny_model
from tests.hub.label_factory import label_sae
from tests.steer.helpers import random_sae

NP_ID = "tiny-it/1-res-test"
PAGES = "https://www.neuronpedia.org/tiny-it/1-res-test"


@pytest.fixture(scope="module")
def server(chatml_tokenizer, tmp_path_factory):
    """A server with `linked` (labels and a Neuronpedia id) and `unlinked` (labels only)."""
    root = tmp_path_factory.mktemp("serve_neuronpedia")
    model = build_tiny_model("llama", len(chatml_tokenizer))
    folders = {}
    for name, extra in (("linked", {"neuronpedia_id": NP_ID}), ("unlinked", {})):
        sae = random_sae(model.config.hidden_size, 32, metadata={**sae_metadata(MODEL, LAYER), **extra})
        folders[name] = save_sae(sae, root / name)
        label_sae(folders[name], root / f"run-{name}")
    saes = load_named_saes([f"{n}={f}" for n, f in folders.items()], model.device, model.config.hidden_size)
    service = make_service(model, chatml_tokenizer, saes, model_name=MODEL, limits=Limits(max_new_tokens=4))
    with BackgroundServer(service) as srv:
        yield srv


def test_saes_list_their_neuronpedia_source(server):
    listing = httpx.get(f"{server.url}/saes").json()
    by_name = {s["id"]: s for s in listing["data"]}
    assert by_name["linked"]["neuronpedia"] == {
        "id": NP_ID,
        "url": PAGES,
        "feature_url": PAGES + "/{feature}",
    }
    assert by_name["unlinked"]["neuronpedia"] is None


def test_found_features_link_to_their_page(server):
    hits = httpx.get(f"{server.url}/saes/linked/features", params={"q": "tone"}).json()
    assert [h["feature"] for h in hits] == [3, 7]
    assert [h["neuronpedia_url"] for h in hits] == [f"{PAGES}/3", f"{PAGES}/7"]
    plain = httpx.get(f"{server.url}/saes/unlinked/features", params={"q": "tone"}).json()
    assert [h["feature"] for h in plain] == [3, 7] and all(h["neuronpedia_url"] is None for h in plain)

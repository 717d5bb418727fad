"""Feature labels in the demo, through gradio_client: the label columns of the top-features and intervention
tables, the captions, the search box, and steering with a feature found by its label."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from apps.demo.loading import load_demo_sae  # noqa: E402
from apps.demo.settings import DemoLimits  # noqa: E402
from hub import save_sae  # noqa: E402
from hub.labels import LABELS_FILE, LabelsWarning  # noqa: E402
from steer.sae import SAEConfig, build_sae  # noqa: E402
from tests.apps.demo.helpers import D_SAE, GRADIO_WARNINGS, LAYER, serve, tiny_backend  # noqa: E402
from tests.conftest import build_tiny_model  # noqa: E402
from tests.hub.label_factory import label_sae  # noqa: E402

pytestmark = GRADIO_WARNINGS

MAX_SEARCH = 40
EMPTY_TABLE = {"headers": ["feature", "op", "strength", "positions", "label"], "data": []}


@pytest.fixture(scope="module")
def server(chatml_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_labels")
    limits = DemoLimits(max_new_tokens=24, max_prompt_tokens=1024, max_search_chars=MAX_SEARCH)
    backend = tiny_backend(
        chatml_tokenizer, root / "sae", before_load=lambda f: label_sae(f, root / "run"), limits=limits
    )
    app, url = serve(backend)
    yield backend, Client(url, verbose=False, download_files=False)
    app.close()


def test_search_finds_a_feature_by_label_and_it_steers(server):
    backend, client = server
    found = client.predict("tiny-sae", "capital city", api_name="/search_features")
    assert found["headers"] == ["match", "feature", "label", "score", "density"]
    match, feature, label, score, density = found["data"][0]
    assert (feature, label, score, density) == (5, "capital city", 4.0, 0.004) and match > 0
    strength = backend.max_strength(backend.default_sae)
    table = client.predict(EMPTY_TABLE, "tiny-sae", feature, "add", strength, "all", api_name="/add_edit")
    assert table["data"] == [[5, "add", strength, "all", "capital city"]], (
        "the intervention table labels edits"
    )
    spec = client.predict("tiny-sae", table, api_name="/export_spec")
    assert json.loads(spec)["interventions"][0]["edits"][0]["feature"] == 5
    out = client.predict(messages=[], message="Name a city.", spec=spec, temperature=0, max_new_tokens=12,
                         api_name="/generate")  # fmt: skip
    assert out["steered"] != out["plain"], "the feature found by its label steers the reply"
    name, rows = client.predict(spec, api_name="/import_spec")
    assert name == "tiny-sae" and rows["data"] == table["data"]


def test_empty_unmatched_and_too_long_searches(server):
    _, client = server
    assert client.predict("tiny-sae", "", api_name="/search_features")["data"] == []
    assert client.predict("tiny-sae", "zebra", api_name="/search_features")["data"] == []
    with pytest.raises(
        AppError, match=f"the search is {MAX_SEARCH + 1} characters long; the limit is {MAX_SEARCH}"
    ):
        client.predict("tiny-sae", "x" * (MAX_SEARCH + 1), api_name="/search_features")


def test_tables_and_captions_show_labels(server):
    backend, client = server
    info, table, *_ = client.predict("tiny-sae", api_name="/select_sae")
    assert table["headers"] == ["token", "feature", "mean max act", "label"]
    expected = {
        t.feature: backend.default_sae.labels.get(t.feature) or "" for t in backend.default_sae.top_features
    }
    assert {row[1]: row[3] for row in table["data"]} == expected
    history = [{"role": "user", "content": [{"type": "text", "text": "Be polite"}]}]
    _, tokens = client.predict("tiny-sae", 3, history, api_name="/lookup_feature")
    assert "feature 3 (&quot;polite tone&quot;) on the steered conversation" in tokens
    top = backend.default_sae.top_features[0].feature  # fires on the sample conversations
    contexts, _ = client.predict("tiny-sae", top, history, api_name="/lookup_feature")
    label = backend.default_sae.labels.get(top)
    assert (
        f"Top contexts of feature {top}" + (f" (&quot;{label}&quot;)" if label else "") + "</b>" in contexts
    )
    _, tokens = client.predict("tiny-sae", 4, history, api_name="/lookup_feature")
    assert "feature 4 on the steered conversation" in tokens, "an unlabelled feature's caption is as before"


def test_a_demo_without_labels_has_no_search_and_no_label_column(chatml_tokenizer, tmp_path):
    backend = tiny_backend(chatml_tokenizer, tmp_path / "sae")
    assert backend.labelled is False and len(backend.feature_rows(None)[0]) == 3
    app, url = serve(backend)
    try:
        named = Client(url, verbose=False, download_files=False).view_api(
            return_format="dict", print_info=False
        )
        assert "/search_features" not in named["named_endpoints"] and "/add_edit" in named["named_endpoints"]
    finally:
        app.close()


def test_a_malformed_labels_file_warns_and_the_demo_loads_the_sae(chatml_tokenizer, tmp_path):
    model = build_tiny_model("llama", len(chatml_tokenizer))
    metadata = {"hook_name": f"blocks.{LAYER}.hook_resid_post"}
    save_sae(build_sae(SAEConfig("standard", d_in=64, d_sae=D_SAE, metadata=metadata)), tmp_path / "sae")
    (tmp_path / "sae" / LABELS_FILE).write_text(
        '{"format": "fast-steer-labels", "version": 1, "labellings": {}}'
    )
    with pytest.warns(LabelsWarning, match=r"explanations.json: field 'labellings' must be a list"):
        demo_sae = load_demo_sae(str(tmp_path / "sae"), model, name="x")
    assert demo_sae.labels is None and demo_sae.sae.d_sae == D_SAE

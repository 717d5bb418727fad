"""The demo's named endpoints through gradio_client, on a tiny Llama with a random SAE saved to a folder."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from apps.demo import EditRow  # noqa: E402
from apps.demo.backend import DemoSAE  # noqa: E402
from apps.demo.conversation import to_conversation  # noqa: E402
from apps.demo.loading import load_demo_sae  # noqa: E402
from apps.demo.residuals import sample_residuals  # noqa: E402
from apps.demo.spec_io import build_interventions  # noqa: E402
from apps.evaluation.primitives import added_norm  # noqa: E402
from hub import save_sae  # noqa: E402
from steer.sae import SAEConfig, build_sae  # noqa: E402
from steer.spec import Intervention, load_interventions  # noqa: E402
from tests.apps.demo.helpers import D_SAE, GRADIO_WARNINGS, LAYER, serve, tiny_backend  # noqa: E402
from tests.conftest import read_conversations  # noqa: E402
from train.features import special_residual_norm  # noqa: E402
from train.sequences import render_conversation  # noqa: E402

pytestmark = GRADIO_WARNINGS

EMPTY_TABLE = {"headers": ["feature", "op", "strength", "positions"], "data": []}


@pytest.fixture(scope="module")
def server(chatml_tokenizer, tmp_path_factory):
    backend = tiny_backend(chatml_tokenizer, tmp_path_factory.mktemp("demo") / "sae")
    app, url = serve(backend)
    client = Client(url, verbose=False, download_files=False)
    yield backend, client
    app.close()


def _words(text: str) -> list[str]:
    """Text up to whitespace (the Chatbot shows tabs as spaces)."""
    return text.split()


def _table(rows: list[EditRow]) -> dict:
    return {**EMPTY_TABLE, "data": [r.as_list() for r in rows]}


def _strong_rows(backend) -> list[EditRow]:
    feature = backend.default_sae.top_features[0].feature
    return [EditRow(feature, "add", backend.max_strength(backend.default_sae), "all")]


def test_named_endpoints(server):
    _, client = server
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in (
        "/send",
        "/generate",
        "/lookup_feature",
        "/add_edit",
        "/export_spec",
        "/import_spec",
        "/select_sae",
    ):
        assert name in named, f"{name} missing from {sorted(named)}"


def test_generate_plain_matches_model_and_steering_changes_it(server):
    backend, client = server
    spec = backend.export(None, _strong_rows(backend))
    out = client.predict(
        messages=[],
        message="Tell me a story.",
        spec=spec,
        temperature=0,
        max_new_tokens=12,
        api_name="/generate",
    )
    assert set(out) == {"plain", "steered", "steered_positions"}
    # The plain pane is exactly the unwrapped model's greedy reply.
    tok = backend.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me a story."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        ref = backend.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out["plain"] == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert out["steered"] != out["plain"]
    assert out["steered_positions"] >= ids.shape[1], "positions `all`: every prompt position was edited"


def test_send_streams_both_panes_with_shared_seed(server):
    backend, client = server
    job = client.submit(
        message="Hello there",
        plain_history=[],
        steered_history=[],
        baseline_history=[],
        sae="tiny-sae",
        edits=EMPTY_TABLE,
        temperature=1.0,
        top_p=0.9,
        max_new_tokens=10,
        seed=7,
        show_baseline=True,
        system_prompt="You are a pirate.",
        api_name="/send",
    )
    final = job.result()
    updates = job.outputs()
    assert len(updates) > 3, "replies should stream in several updates"
    plain, steered, baseline = (to_conversation(pane) for pane in final[1:])
    for pane in (plain, steered, baseline):
        assert [m["role"] for m in pane] == ["user", "assistant"]
    # No edits: same settings and seed give the same sampled reply in both panes ...
    assert plain[1]["content"] == steered[1]["content"]
    # ... and the baseline pane saw the system prompt, so its prompt (and with it its reply) differs.
    settings = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 10, "seed": 7}
    direct = client.predict(
        messages=[],
        message="Hello there",
        system_prompt="You are a pirate.",
        **settings,
        api_name="/generate",
    )
    assert _words(direct["plain"]) == _words(plain[1]["content"])
    assert _words(direct["baseline"]) == _words(baseline[1]["content"])


def test_second_turn_keeps_each_panes_history(server):
    backend, client = server
    rows = _strong_rows(backend)
    first = client.predict(
        "Hi", [], [], [], "tiny-sae", _table(rows), 0, 1.0, 6, 0, False, "", api_name="/send"
    )
    plain, steered = (to_conversation(pane) for pane in first[1:3])
    # the steered reply is followed by a note of the positions its spec edited, which the model never reads
    note = first[2][-1]
    assert note["metadata"]["title"].startswith("steered ") and note["metadata"]["title"].endswith(
        " positions"
    )
    assert int(note["metadata"]["title"].split()[1]) > 0
    assert [m["role"] for m in steered] == ["user", "assistant"] and len(first[2]) == 3
    second = client.predict(
        "And then?",
        first[1],
        first[2],
        [],
        "tiny-sae",
        _table(rows),
        0,
        1.0,
        6,
        0,
        False,
        "",
        api_name="/send",
    )
    plain2, steered2 = (to_conversation(pane) for pane in second[1:3])
    assert [m["role"] for m in plain2] == ["user", "assistant"] * 2
    assert [m["role"] for m in steered2] == ["user", "assistant"] * 2 and len(second[2]) == 6
    assert plain2[1]["content"] == plain[1]["content"]
    assert steered2[1]["content"] == steered[1]["content"] != plain[1]["content"]


def test_export_import_round_trip(server, tmp_path):
    backend, client = server
    feature = backend.default_sae.top_features[0].feature
    table = client.predict(EMPTY_TABLE, "tiny-sae", feature, "add", 0.5, "special", api_name="/add_edit")
    table = client.predict(table, "tiny-sae", feature + 1, "ablate", 0.0, "all", api_name="/add_edit")
    # Updating an edit for the same feature and positions replaces it.
    table = client.predict(table, "tiny-sae", feature, "add", 0.75, "special", api_name="/add_edit")
    assert table["data"] == [[feature + 1, "ablate", 0.0, "all"], [feature, "add", 0.75, "special"]]
    text = client.predict("tiny-sae", table, api_name="/export_spec")
    data = json.loads(text)
    assert len(data["interventions"]) == 2  # two position modes -> two interventions
    # The spec states its scale: R and the page's strength of each add edit.
    norm = backend.default_sae.residual_norm
    scale = data["metadata"]["strength_scale"]
    assert scale["norm"] == pytest.approx(norm)
    assert scale["add_strengths"] == [{"feature": feature, "positions": "special", "strength": 0.75}]
    # What the page exports is what `fast-steer chat --spec` reads: it loads the SAE folder by reference,
    # and an add edit holds the norm it adds (strength 0.75 adds 0.75 % of R).
    path = tmp_path / "spec.json"
    path.write_text(text)
    specs = load_interventions(path)
    assert [(s.positions, [e.to_dict() for e in s.edits]) for s in specs] == [
        ("all", [{"feature": feature + 1, "op": "ablate", "strength": 0.0}]),
        ("special", [{"feature": feature, "op": "add", "strength": pytest.approx(0.0075 * norm)}]),
    ]
    assert all(s.layer == LAYER for s in specs)
    loaded = specs[0].load_sae()
    assert torch.equal(loaded.W_dec, backend.default_sae.sae.W_dec)
    name, rows = client.predict(text, api_name="/import_spec")
    assert name == "tiny-sae"
    assert rows["data"] == table["data"]
    # A single-mode intervention exports as one intervention beside the same metadata.
    single = client.predict("tiny-sae", {**EMPTY_TABLE, "data": [table["data"][1]]}, api_name="/export_spec")
    (spec,) = json.loads(single)["interventions"]
    assert Intervention.from_dict(spec).edits[0].strength == pytest.approx(0.0075 * norm)


def test_strength_is_on_the_study_scale(server):
    """The demo's R is steer-eval's statistic; a demo strength adds what steer-eval's `added_norm` does."""
    backend, _ = server
    model, tok = backend.model, backend.tokenizer
    # conversations the demo's sample keeps whole (it truncates at 512 tokens, steer-eval at 2048)
    short = [c for c in read_conversations(n=40) if len(render_conversation(tok, c)) <= 512][:8]
    s = DemoSAE(
        "tiny-sae",
        backend.default_sae.sae,
        sample=sample_residuals(model, tok, short, LAYER, backend.special),
    )
    norm = special_residual_norm(model, tok, LAYER, short)
    assert s.residual_norm == pytest.approx(norm, rel=1e-5)
    (spec,) = build_interventions(s, [EditRow(3, "add", 150.0, "special")])
    assert spec.edits[0].strength == pytest.approx(added_norm(150.0, norm), rel=1e-5)
    # A typical-norm statistic over all positions would differ: this one reads special positions only.
    everything = torch.cat([r[1:].norm(dim=-1) for r in s.sample.residuals]).median()
    assert float(everything) != pytest.approx(norm, rel=1e-3)


def test_bad_input_gives_clear_errors(server, tmp_path):
    backend, client = server
    limit = backend.max_strength(backend.default_sae)
    with pytest.raises(AppError, match=f"unknown feature id {D_SAE}"):
        client.predict(EMPTY_TABLE, "tiny-sae", D_SAE, "add", 0.5, "special", api_name="/add_edit")
    with pytest.raises(AppError, match="greater than maximum"):  # the slider's own bound
        client.predict(EMPTY_TABLE, "tiny-sae", 3, "add", limit * 10, "special", api_name="/add_edit")
    too_strong = _table([EditRow(3, "add", limit * 10, "special")])
    with pytest.raises(AppError, match=f"row 1: strength {limit * 10} is out of range"):
        client.predict("Hi", [], [], [], "tiny-sae", too_strong, 0, 1.0, 6, 0, False, "", api_name="/send")
    with pytest.raises(AppError, match="max new tokens must be between 1 and 24"):
        client.predict(messages=[], message="Hi", max_new_tokens=500, api_name="/generate")
    with pytest.raises(AppError, match="type a message first"):
        client.predict(messages=[], message="   ", api_name="/generate")
    # A spec naming an SAE the server was not started with is refused, never loaded from disk.
    other = {
        "layer": LAYER,
        "sae": str(tmp_path / "elsewhere"),
        "edits": [{"feature": 1, "op": "add", "strength": 1}],
    }
    with pytest.raises(AppError, match="was not started with"):
        client.predict(json.dumps(other), api_name="/import_spec")
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict("{nope", api_name="/import_spec")


def test_lookup_feature_renders_contexts_and_token_view(server):
    backend, client = server
    feature = backend.default_sae.top_features[0].feature
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    as_chatbot = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in history]
    contexts, tokens = client.predict("tiny-sae", feature, as_chatbot, api_name="/lookup_feature")
    assert f"Top contexts of feature {feature}" in contexts
    assert "fs-special" in tokens  # special tokens are marked
    assert tokens.count("<span class='fs-tok") == len(
        backend.tokenizer.apply_chat_template(history, tokenize=True, return_dict=True)["input_ids"]
    )


def test_sae_that_does_not_fit_is_refused(chatml_tokenizer, tmp_path):
    from tests.conftest import build_tiny_model

    model = build_tiny_model("llama", len(chatml_tokenizer))
    wide = build_sae(
        SAEConfig("standard", d_in=32, d_sae=64, metadata={"hook_name": "blocks.1.hook_resid_post"})
    )
    save_sae(wide, tmp_path / "wide")
    with pytest.raises(ValueError, match="does not fit the model: it reads d_in=32"):
        load_demo_sae(str(tmp_path / "wide"), model)
    deep = build_sae(
        SAEConfig("standard", d_in=64, d_sae=64, metadata={"hook_name": "blocks.9.hook_resid_post"})
    )
    save_sae(deep, tmp_path / "deep")
    with pytest.raises(ValueError, match="layer 9 is outside the model's 4 layers"):
        load_demo_sae(str(tmp_path / "deep"), model)


def test_demo_command_rejects_a_missing_sae_before_loading_anything(tmp_path):
    from click.testing import CliRunner

    from apps.cli import main

    result = CliRunner().invoke(main, ["demo", "--sae", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "neither an existing folder nor a Hub reference" in result.output

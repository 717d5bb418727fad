"""`fast-steer features` end to end: a saved tiny model, a saved SAE with a planted feature, real chat data."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from apps.cli import main
from hub.sae_io import save_sae
from tests.conftest import CHAT_DATA, read_conversations, save_tiny_model
from tests.train.test_features import LAYER, PLANTED, planted_sae

N = 16


@pytest.fixture(scope="module")
def saved(chatml_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("features_cli")
    model = save_tiny_model(root / "model", chatml_tokenizer)
    sae = planted_sae(model, chatml_tokenizer, read_conversations(n=N))
    save_sae(sae, root / "sae")
    return root


def test_features_json_and_table(saved):
    out = saved / "report.json"
    args = ["features", str(saved / "sae"), "--data", str(CHAT_DATA / "gpteacher.jsonl"), "--model"]
    args += [str(saved / "model"), "--n", str(N), "--top", "3", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["layer"] == LAYER and report["n_conversations"] == N
    assert report["token_types"]["<|im_start|>"]["top"][0]["feature"] == PLANTED
    assert f"feature {PLANTED:6d}" in result.output and "'<|im_start|>'" in result.output


def test_feature_contexts_highlighted(saved):
    args = ["features", str(saved / "sae"), "--data", str(CHAT_DATA / "gpteacher.jsonl"), "--model"]
    args += [str(saved / "model"), "--n", str(N), "--feature", str(PLANTED), "--contexts", "3", "--no-color"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "[[" in line]
    assert len(lines) == 3 and all("[[<|im_start|>]]" in line for line in lines)
    colored = CliRunner().invoke(main, [*args[:-1], "--color"])
    assert "\033[1;31m<|im_start|>\033[0m" in colored.output


def test_features_clear_errors(saved, tmp_path):
    base = ["features", str(saved / "sae"), "--data", str(CHAT_DATA / "gpteacher.jsonl"), "--model"]
    result = CliRunner().invoke(main, [*base, str(saved / "model"), "--n", "2", "--feature", "999"])
    assert result.exit_code != 0 and "feature 999 out of range" in result.output
    result = CliRunner().invoke(main, [*base, str(tmp_path / "nope"), "--n", "2"])
    assert result.exit_code != 0 and "could not load model" in result.output


def test_features_link_to_neuronpedia(saved):
    """An SAE whose metadata carries a Neuronpedia id (a registered release) gets a page link per feature."""
    from hub import load_sae

    sae = load_sae(saved / "sae")
    sae.cfg.metadata["neuronpedia_id"] = "tiny-it/2-res-test"
    save_sae(sae, saved / "sae-np")
    args = ["features", str(saved / "sae-np"), "--data", str(CHAT_DATA / "gpteacher.jsonl"), "--model"]
    args += [str(saved / "model"), "--n", str(N), "--top", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"https://www.neuronpedia.org/tiny-it/2-res-test/{PLANTED}" in result.output
    single = CliRunner().invoke(
        main, [*args[:-2], "--feature", str(PLANTED), "--contexts", "1", "--no-color"]
    )
    assert f"Neuronpedia: https://www.neuronpedia.org/tiny-it/2-res-test/{PLANTED}" in single.output

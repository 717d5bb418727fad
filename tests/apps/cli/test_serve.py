"""`fast-steer serve` as users start it: a subprocess on a saved tiny model, `--sae` folders (one with the
feature table `fast-steer run` writes), a `--spec` file whose `sae` is a folder, and the bind rule."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.serve.loading import default_steering, load_named_saes
from apps.serve.process import serve_process
from hub import sae_metadata, save_sae
from steer import SpecError
from tests.apps.serve.helpers import LAYER, STRONG, tiny_parts
from tests.steer.helpers import random_sae


@pytest.fixture(scope="module")
def saved(chatml_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_serve")
    model, tok, sae_dir = tiny_parts(chatml_tokenizer, root)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    table = [{"token": "<|im_start|>", "feature": 3, "mean_max": 1.5}]
    (sae_dir / "features.json").write_text(json.dumps(table))
    spec = {
        **STRONG,
        "sae": "sae",
    }  # a folder relative to the spec file, as `fast-steer chat --spec` reads it
    (root / "spec.json").write_text(json.dumps(spec))
    return root


def test_serve_command(saved):
    options = ["--model", str(saved / "model"), "--served-model-name", "tiny", "--sae", f"mine={saved / 'sae'}",
               "--spec", str(saved / "spec.json"), "--device", "cpu"]  # fmt: skip
    with serve_process(*options) as base:
        (sae,) = httpx.get(base + "/v1/saes").json()["data"]
        assert sae["id"] == "mine" and sae["layer"] == LAYER
        assert sae["top_features"] == [{"token": "<|im_start|>", "feature": 3, "mean_max_activation": 1.5}]
        default = httpx.get(base + "/v1/steering").json()["steering"]
        assert default == [{**STRONG, "sae": "mine", "positions": "special"}]  # the folder became its name
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6,
                "temperature": 0}  # fmt: skip
        by_default = httpx.post(base + "/v1/chat/completions", json=body).json()
        steered = httpx.post(base + "/v1/chat/completions", json={**body, "steering": default}).json()
        plain = httpx.post(base + "/v1/chat/completions", json={**body, "steering": None}).json()
        assert by_default["choices"][0]["message"] == steered["choices"][0]["message"]
        assert plain["choices"][0]["message"] != steered["choices"][0]["message"]


def test_serve_refuses_open_host_without_key(saved):
    result = CliRunner().invoke(main, ["serve", "--model", str(saved / "model"), "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "--api-key" in result.output


def test_default_spec_file_by_name_folder_or_new_folder(saved, tmp_path):
    other = save_sae(random_sae(64, 32, metadata=sae_metadata("tiny", LAYER)), tmp_path / "other")
    saes = load_named_saes([f"mine={saved / 'sae'}"], "cpu", 64)
    specs = [{**STRONG, "sae": "mine"}, {**STRONG, "sae": str(saved / "sae")}, {**STRONG, "sae": str(other)}]
    (tmp_path / "spec.json").write_text(json.dumps(specs))
    out = default_steering(tmp_path / "spec.json", saes, "cpu", 64)
    assert [s["sae"] for s in out] == ["mine", "mine", "other"] and [s.name for s in saes] == [
        "mine",
        "other",
    ]
    (tmp_path / "bad.json").write_text(json.dumps({**STRONG, "sae": "not-a-folder"}))
    with pytest.raises(SpecError, match="neither an existing folder nor a Hub reference"):
        default_steering(tmp_path / "bad.json", saes, "cpu", 64)

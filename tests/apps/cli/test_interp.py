"""`fast-steer interp collect` end to end: a saved tiny model, a saved random SAE, real chat data."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from apps.cli import main
from hub.sae_io import save_sae
from tests.conftest import CHAT_DATA, read_conversations, save_tiny_model
from tests.train.test_interp_collect import random_sae
from train.interp import store

N = 12


@pytest.fixture(scope="module")
def saved(chatml_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("interp_cli")
    model = save_tiny_model(root / "model", chatml_tokenizer)
    save_sae(random_sae(model, chatml_tokenizer, read_conversations(n=N), seed=0), root / "sae")
    return root


def collect_args(saved, sae: str, out) -> list[str]:
    args = ["interp", "collect", sae, "--data", str(CHAT_DATA / "gpteacher.jsonl"), "--split", "all"]
    return args + [
        "--instances",
        str(N),
        "--out",
        str(out),
        "--model",
        str(saved / "model"),
        "--device",
        "cpu",
    ]


def test_collect_writes_then_reuses_a_collection(saved, tmp_path):
    result = CliRunner().invoke(main, collect_args(saved, str(saved / "sae"), tmp_path))
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    manifest = json.loads((folder / store.MANIFEST).read_text())
    assert f"collection: {folder}" in result.output
    assert f"{N} conversations (of {N} asked)" in result.output
    assert manifest["data"]["conversations"] == N and manifest["settings"]["split"] == "all"
    assert manifest["settings"]["model"] == str(saved / "model")
    before = (folder / store.MANIFEST).stat().st_mtime_ns
    again = CliRunner().invoke(main, collect_args(saved, str(saved / "sae"), tmp_path))
    assert again.exit_code == 0, again.output
    assert again.stdout == result.stdout
    assert (folder / store.MANIFEST).stat().st_mtime_ns == before and len(list(tmp_path.iterdir())) == 1


def test_collect_help_reads_defaults_from_the_config():
    from train.interp.collect import CollectConfig

    result = CliRunner().invoke(main, ["interp", "collect", "--help"])
    assert result.exit_code == 0
    assert f"[default: {CollectConfig.instances}]" in " ".join(result.output.split())
    assert CollectConfig.instances == 10_000 and CollectConfig.split == "held-out"


def test_collect_errors_are_one_line(saved, tmp_path):
    missing = CliRunner().invoke(main, collect_args(saved, str(tmp_path / "no_sae"), tmp_path / "out"))
    assert missing.exit_code == 1 and "Error: SAE source" in missing.output
    assert "Traceback" not in missing.output
    args = collect_args(saved, str(saved / "sae"), tmp_path / "out")
    bad_split = CliRunner().invoke(main, [*args[:5], "--split", "test", *args[7:]])
    assert bad_split.exit_code == 1 and "split must be one of held-out, all" in bad_split.output
    assert not (tmp_path / "out").exists()

"""`fast-steer chat` on a tiny saved model and SAE: one-shot, spec files, interactive turns, errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.cli.chat import side_by_side
from steer import Edit, Intervention
from steer.spec import dump_interventions
from tests.conftest import save_tiny_model
from tests.steer.helpers import random_sae


@pytest.fixture(scope="module")
def saved(tmp_path_factory, chatml_tokenizer):
    """(model folder, SAE folder with layer metadata) of a tiny Llama and a random SAE."""
    from hub import save_sae

    root = tmp_path_factory.mktemp("chat")
    model = save_tiny_model(root / "model", chatml_tokenizer, n_layers=3)
    sae = random_sae(model.config.hidden_size, 32)
    sae.cfg.metadata["hook_name"] = "blocks.1.hook_resid_post"
    save_sae(sae, root / "sae")
    return root / "model", root / "sae"


def _run(args, input=None):
    result = CliRunner().invoke(main, ["chat", *args], input=input)
    return result


def test_one_shot_side_by_side_json(saved):
    model_dir, sae_dir = saved
    args = ["--model", str(model_dir), "--sae", str(sae_dir), "--feature", "3", "--strength", "60"]
    result = _run([*args, "--max-new-tokens", "6", "--json", "Tell me a story"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["prompt"] == "Tell me a story"
    assert row["unsteered"] != row["steered"], "a strong add at special positions changes the reply"
    assert row["steering"] == "steered (L1 #3 add 60 @special)", "layer read from the SAE metadata"
    assert row["steered_positions"] > 0, "the chat template's special positions were edited"
    weak = _run([*args[:-1], "0", "--max-new-tokens", "6", "--json", "Tell me a story"])
    assert weak.exit_code == 0, weak.output
    row0 = json.loads(weak.stdout.strip().splitlines()[-1])
    assert row0["unsteered"] == row0["steered"] == row["unsteered"], "greedy, same seed: reproducible"
    table = _run([*args, "--max-new-tokens", "4", "Hi"])
    assert table.exit_code == 0, table.output
    header = table.stdout.splitlines()[0]
    assert header.startswith("unsteered") and "| steered " in header
    assert int(header.split("| steered ")[1].split()[0]) > 0, "the title counts the edited positions"


def test_spec_file_and_sae_override(saved, tmp_path):
    model_dir, sae_dir = saved
    spec = Intervention(layer=1, sae=str(sae_dir), edits=[Edit(5, "set", 9.0)], positions="all")
    elsewhere = Intervention(layer=0, sae=str(sae_dir), edits=[Edit(1, "add", 4.0)])
    path = tmp_path / "spec.json"
    path.write_text(dump_interventions([spec, elsewhere]))
    wrong_layer = _run(["--model", str(model_dir), "--spec", str(path), "--max-new-tokens", "4", "Hello"])
    assert wrong_layer.exit_code != 0
    assert "edits layer 0, but its SAE was trained on layer 1" in wrong_layer.output
    elsewhere.allow_layer_mismatch = True
    path.write_text(dump_interventions([spec, elsewhere]))
    result = _run(
        ["--model", str(model_dir), "--spec", str(path), "--max-new-tokens", "4", "--json", "Hello"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["steering"] == (
        "steered (L1 #5 set 9 @all; L0 #1 add 4 @special)"
    )
    override = _run(
        [
            "--model",
            str(model_dir),
            "--spec",
            str(path),
            "--sae",
            str(sae_dir),
            "--json",
            "--max-new-tokens",
            "2",
            "x",
        ]
    )
    assert override.exit_code == 0, override.output


def test_interactive_multi_turn(saved):
    model_dir, sae_dir = saved
    args = ["--model", str(model_dir), "--sae", str(sae_dir), "--feature", "3", "--op", "ablate"]
    result = _run(
        [*args, "--positions", "all", "--max-new-tokens", "3", "--json"],
        input="Hi there\n\n/reset\nAgain\n/quit\nignored\n",
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["Hi there", "Again"]
    assert "(history cleared)" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "either --spec FILE or --feature K"),
        (["--feature", "1", "--strength", "2"], "--feature needs --sae"),
        (["--feature", "99", "--strength", "2", "--sae", "{sae}"], "features [99] are out of range"),
        (["--feature", "1", "--op", "scale", "--sae", "{sae}"], "--op scale needs --strength"),
        (["--feature", "1", "--strength", "2", "--sae", "{sae}", "--layer", "7"], "layer 7 is out of range"),
        (
            ["--feature", "1", "--strength", "2", "--sae", "{sae}", "--positions", "the cat"],
            "not a single token",
        ),
        (["--feature", "1", "--strength", "2", "--sae", "/nonexistent"], "neither an existing folder"),
    ],
)
def test_errors_are_clear(saved, args, message):
    model_dir, sae_dir = saved
    args = [a.replace("{sae}", str(sae_dir)) for a in args]
    result = _run(["--model", str(model_dir), *args, "Hi"])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_side_by_side_wraps_columns():
    text = side_by_side(("left", "word " * 30), ("right", "short\nsecond line"), width=63)
    lines = text.splitlines()
    assert all(len(line) <= 63 for line in lines)
    assert lines[0].startswith("left") and "| right" in lines[0]
    assert lines[3].endswith("| second line")


@pytest.mark.integration
def test_chat_on_default_model(tmp_path):
    from hub import save_sae

    save_sae(random_sae(576, 64), tmp_path / "sae")
    args = ["--sae", str(tmp_path / "sae"), "--layer", "15", "--feature", "0", "--strength", "1000", "--json"]
    result = _run([*args, "--max-new-tokens", "8", "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[-1])
    assert "Paris" in row["unsteered"]
    assert row["steered"] != row["unsteered"]

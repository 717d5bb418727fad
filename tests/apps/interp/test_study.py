"""The FAST vs BT study end to end on a tiny model: `experiment reproduce` (JumpReLU, no-first, three
methods), `experiment interp` with a scripted judge over real HTTP, then `experiment report --interp`, whose
section shows the numbers of the interp.json files; missing or misnamed runs give clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.interp.fake_judge import serve_fake_judge
from apps.interp.report import PAPER
from apps.interp.study import load_runs
from steer.errors import ConfigError, MissingFileError
from tests.apps.interp.test_run import scripted
from tests.conftest import save_tiny_model
from tests.train.test_experiment import write_small_data
from train.sequences import METHODS


@pytest.fixture(scope="module")
def study(tmp_path_factory, chatml_tokenizer):
    root = tmp_path_factory.mktemp("study")
    model = root / "tiny-llama"
    save_tiny_model(model, chatml_tokenizer)
    chat, pre = write_small_data(root, n_chats=400)
    out = root / "exp"
    runner = CliRunner()
    reproduce = runner.invoke(main, [
        "experiment", "reproduce", "--model", str(model), "--layer", "1", "--tokens", "256", "--batch-size", "128",
        "--buffer-tokens", "256", "--max-len", "2048", "--expansion", "2", "--eval-conversations", "3",
        "--data", str(chat), "--pretrain-data", str(pre), "--arch", "jumprelu", "--variant", "no-first",
        "--dtype", "float32", "--out", str(out), "--quiet"])  # fmt: skip
    assert reproduce.exit_code == 0, reproduce.output
    with serve_fake_judge(scripted) as server:
        args = ["experiment", "interp", "--out", str(out), "--judge-url", server.url, "--judge-model", "scripted",
                "--features", "3", "--instances", "400", "--device", "cpu"]  # fmt: skip
        first = runner.invoke(main, args)
        assert first.exit_code == 0, first.output
        hits = server.hits
        again = runner.invoke(main, args)
        assert again.exit_code == 0 and server.hits == hits  # a rerun costs nothing
    return out, first


def test_the_study_scores_each_method_into_its_folder(study):
    out, result = study
    runs = load_runs([out / "interp"])
    assert list(runs) == list(METHODS)
    for method, run in runs.items():
        assert f"/runs/{method}/no-first" in run["settings"]["sae"]
        assert run["summary"]["fast_paper"]["share_4_5"]["value"] == 1.0  # the scripted judge gives 4
    assert "FAST: share 4-5 1.0" in result.stdout


def test_the_report_renders_the_interp_section_from_the_files(study, tmp_path):
    out, _ = study
    doc = tmp_path / "docs" / "results.md"
    result = CliRunner().invoke(main, ["experiment", "report", "--out", str(out), "--doc", str(doc),
                                       "--interp", str(out / "interp")])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    runs = load_runs([out / "interp"])
    assert "## What a feature means: auto-interpretability, FAST vs BT" in text
    share = runs["fast"]["summary"]["fast_paper"]["share_4_5"]
    assert f"{100 * share['value']:.1f}% [{100 * share['ci_low']:.1f}, {100 * share['ci_high']:.1f}]" in text
    assert "21.1%" in text and "7.0%" in text and "92.2%" in text and len(PAPER) == 2
    assert "- FAST - BT(F): share 4-5 +0 pp" in text and "FAST - BT(P)" in text
    assert "controls not run: the judge is not validated" in text
    assert "fast-steer experiment interp --out" in text and "--judge-url https://" in text
    detection = runs["bt-p"]["summary"]["detection"]
    assert f"| BT(P) | detection | {detection['balanced_accuracy_median']:.3g} |" in text
    assert (doc.parent / "interp" / "fast" / "interp.json").is_file()
    plain = CliRunner().invoke(
        main, ["experiment", "report", "--out", str(out), "--doc", str(tmp_path / "d.md")]
    )
    assert plain.exit_code == 0 and "auto-interpretability" in (tmp_path / "d.md").read_text()  # OUT/interp


def test_missing_or_misnamed_runs_are_refused(study, tmp_path):
    out, _ = study
    with pytest.raises(
        MissingFileError, match=r"holds no interp.json, neither itself nor in fast/, bt-f/, bt-p/"
    ):
        load_runs([tmp_path])
    shutil.copytree(out / "interp" / "fast", tmp_path / "mine")
    with pytest.raises(ConfigError, match="its folder name is not a method"):
        load_runs([tmp_path / "mine"])
    with pytest.raises(ConfigError, match="two interp runs for FAST"):
        load_runs([out / "interp", out / "interp" / "fast"])
    result = CliRunner().invoke(main, ["experiment", "report", "--out", str(out), "--doc", str(tmp_path / "r.md"),
                                       "--interp", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 1 and "holds no interp.json" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["experiment", "interp", "--out", str(empty), "--judge-url",
                                       "http://127.0.0.1:9", "--judge-model", "x"])  # fmt: skip
    assert result.exit_code == 1 and "holds no experiment.json" in result.output
    assert json.loads((out / "experiment.json").read_text())["archs"] == ["jumprelu"]


@pytest.mark.parametrize(
    ("protocols", "flag"),
    [(["fast-paper", "detection", "fuzzing"], "all"), (["fast-paper", "detection"], "fast-paper,detection")],
)
def test_the_strong_judge_command_repeats_the_protocols_that_ran(protocols, flag):
    from apps.interp.report import study_command

    run = {
        "settings": {
            "features": 24,
            "collection": {"settings": {"instances": 600}},
            "protocols": protocols,
            "seed": 0,
            "controls": True,
        }
    }
    command = study_command("/runs/x", run, "https://judge.example/v1", "big")
    assert f"--protocol {flag} " in command and command.endswith("--controls")

"""`fast-steer experiment reproduce` and `sweep` end to end on a tiny saved model (real lm-eval, real steering)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from apps.cli import main
from tests.conftest import EVAL_DATA, save_tiny_model
from tests.train.test_experiment import write_small_data


@pytest.fixture
def tiny_model_dir(tmp_path, chatml_tokenizer):
    folder = tmp_path / "tiny-llama"
    save_tiny_model(folder, chatml_tokenizer)
    return folder


def _report(stdout: str) -> list[str]:
    """The printed report without its title line and the minute it was written (a rerun may cross a minute)."""
    return [line for line in stdout.splitlines()[1:] if not line.startswith("- written:")]


def test_reproduce_then_reuse_then_sweep(tmp_path, tiny_model_dir):
    chat, pre = write_small_data(tmp_path)
    out = tmp_path / "exp"
    args = ["experiment", "reproduce", "--model", str(tiny_model_dir), "--layer", "1", "--tokens", "256",
            "--batch-size", "128", "--buffer-tokens", "256", "--max-len", "2048", "--expansion", "2",
            "--held-out-fraction", "0.2", "--eval-conversations", "3", "--data", str(chat),
            "--pretrain-data", str(pre), "--method", "fast", "--method", "bt-p", "--arch", "standard",
            "--dtype", "float32", "--out", str(out), "--quiet"]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "trained: fast/all, bt-p/all; reused: none" in first.stderr
    assert "| FAST standard |" in first.stdout and "| BT(P) standard |" in first.stdout
    # the folder moves (copied elsewhere, the original deleted): every command works from the new place
    moved = tmp_path / "elsewhere" / "exp"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    out = moved
    args[args.index("--out") + 1] = str(out)
    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "trained: none; reused: fast/all, bt-p/all" in second.stderr
    assert _report(second.stdout) == _report(first.stdout)  # the same results, read back from the runs
    assert "- FAST harvest: `model in float32; device cpu; stored as bfloat16; torch " in second.stdout
    report = runner.invoke(
        main, ["experiment", "report", "--out", str(out), "--doc", str(tmp_path / "d" / "r.md")]
    )
    assert report.exit_code == 0, report.output
    assert "- BT(P) harvest: `model in float32; device cpu;" in (tmp_path / "d" / "r.md").read_text()
    bf16 = runner.invoke(main, [*args[:-5], "--dtype", "bfloat16", "--out", str(out), "--quiet"])
    assert (
        bf16.exit_code == 1
        and "harvested with the model in float32, but bfloat16 is requested" in bf16.output
    )

    sweep = runner.invoke(
        main,
        ["experiment", "sweep", "--out", str(out), "--strengths", "0,200", "--subjects", "marketing",
         "--mmlu-limit", "2", "--max-new-tokens", "4", "--conversations", "3", "--eval-data", str(EVAL_DATA),
         "--dtype", "float32", "--quiet"],
    )  # fmt: skip
    assert sweep.exit_code == 0, sweep.output
    result = json.loads((out / "sweep" / "sweep.json").read_text())
    assert result["anchor_token"] == "<|im_start|>", "ChatML's turn-opening token"
    assert [r["strength"] for r in result["rows"]] == [0.0, 200.0]
    assert result["rows"][0]["alpha"] == 0.0
    assert result["rows"][1]["alpha"] == pytest.approx(2.0 * result["residual_norm_median"])
    assert result["residual_norm_median"] > 0
    assert all(r["mmlu_items"] == 2 and 0.0 <= r["mmlu_acc"] <= 1.0 for r in result["rows"])
    assert all(len(r["replies"]) == len(result["prompts"]) for r in result["rows"])
    assert (out / "sweep" / "sweep.png").stat().st_size > 5000
    assert "| 200 |" in sweep.stdout and f"feature {result['feature']}" in sweep.stdout


def test_sweep_without_reproduce_output_says_what_to_run(tmp_path):
    result = CliRunner().invoke(main, ["experiment", "sweep", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "no trained FAST SAE" in result.output and "experiment reproduce" in result.output


def test_reproduce_rejects_bad_token_count():
    result = CliRunner().invoke(main, ["experiment", "reproduce", "--tokens", "lots"])
    assert result.exit_code == 2 and "is not a token count" in result.output


def test_report_names_what_is_missing(tmp_path):
    empty = tmp_path / "steer"
    empty.mkdir()
    result = CliRunner().invoke(
        main, ["experiment", "report", "--out", str(tmp_path), "--steer-eval", str(empty)]
    )
    assert result.exit_code != 0 and "holds no steer_eval.json" in result.output
    result = CliRunner().invoke(main, ["experiment", "report", "--out", str(tmp_path)])
    assert result.exit_code != 0 and f"{tmp_path / 'results.json'} is missing" in result.output

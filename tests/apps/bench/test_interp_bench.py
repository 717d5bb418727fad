"""`fast-steer bench interp` on a tiny saved model and the fake judge: the JSON holds every figure, consistent
with the targets, and the in-flight ratio follows the concurrency limit (no wall-clock bounds)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from apps.bench.interp import TARGETS, judge_in_flight
from apps.cli import main
from tests.conftest import CHAT_DATA, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, chatml_tokenizer):
    root = tmp_path_factory.mktemp("bench-interp")
    save_tiny_model(root / "model", chatml_tokenizer, n_layers=3)
    return root / "model"


def test_bench_interp_reports_both_ratios_and_their_targets(model_dir):
    args = ["bench", "interp", "--model", str(model_dir), "--data", str(CHAT_DATA / "gpteacher.jsonl"),
            "--conversations", "6", "--expansion", "2", "--l0", "4", "--repeats", "1", "--device", "cpu",
            "--judge-requests", "6", "--judge-concurrency", "2,12", "--judge-delay-ms", "5"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["targets"] == TARGETS and set(out["meets_targets"]) == set(TARGETS)
    for name, goal in TARGETS.items():
        assert out["meets_targets"][name] == (out[name] >= goal)
    collect = out["collection"]
    assert collect["conversations"] == 6 and collect["layer"] == 1
    assert collect["collection_tokens"] == collect["harvest_tokens"] > 0  # the same tokens
    assert collect["collect_over_harvest"] == pytest.approx(
        collect["collect_tokens_per_s"] / collect["harvest_tokens_per_s"]
    )
    judge = out["judge"]
    assert "fake_judge" in judge["server"] and set(judge["by_concurrency"]) == {"2", "12"}
    assert all(r["answered"] == 6 for r in judge["by_concurrency"].values())
    assert out["judge_in_flight_over_limit"] == min(
        r["in_flight_over_limit"] for r in judge["by_concurrency"].values()
    )


def test_bench_interp_refuses_a_zero_limit(model_dir):
    result = CliRunner().invoke(main, ["bench", "interp", "--judge-concurrency", "0,4"])
    assert result.exit_code != 0 and "--judge-concurrency" in result.output


def test_in_flight_ratio_counts_what_could_be_in_flight():
    """The ratio is requests in flight over what could be: the limit, or the requests left when fewer remain,
    so 4 requests under a limit of 16 all in flight read near 1 (not 4/16); the client never exceeds the limit."""
    loose = judge_in_flight(concurrency=16, n_requests=4, delay_s=0.2)
    tight = judge_in_flight(concurrency=2, n_requests=8, delay_s=0.05)
    assert loose["peak_in_flight"] == 4 and 0.5 < loose["in_flight_over_limit"] <= 1.0
    assert loose["mean_in_flight"] <= 4
    assert tight["peak_in_flight"] == 2 and 0 < tight["in_flight_over_limit"] <= 1.0
    assert tight["answered"] == 8 and loose["answered"] == 4

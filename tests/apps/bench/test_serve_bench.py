"""`fast-steer bench serve` on a tiny saved model: its JSON holds every figure of each engine measured, each
consistent with the load it sent, with the servers that took it and with the targets; `--engine vllm` runs its
server with the Python of the vLLM environment, and says how to get one where there is none."""

from __future__ import annotations

import json
import sys

from click.testing import CliRunner

from apps.cli import main
from tests.conftest import save_tiny_model

LOADS = {"plain", "mixed"}


def bench_serve(*args: str) -> dict:
    result = CliRunner().invoke(main, ["bench", "serve", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_counts(out: dict, per_client: int, repeats: int, new_tokens: int) -> None:
    """Each scenario's figures match the load it sent; each server's counters the requests it took (its
    scenarios' and the two warm-up requests), every row steered or not as sent."""
    assert set(out["server_stats"]) == set(out["results"])
    for server, levels in out["results"].items():
        sent = 0
        for level, loads in levels.items():
            for figures in loads.values():
                assert figures["requests"] == repeats * per_client * int(level.removeprefix("c"))
                assert figures["tokens"] == new_tokens * figures["requests"]
                assert (
                    figures["tokens_per_s"] > 0 and 0 < figures["p50_latency_s"] <= figures["p95_latency_s"]
                )
                sent += figures["requests"]
        stats = out["server_stats"][server]
        assert stats["rows"] == 2 + sent and stats["generated_tokens"] == new_tokens * stats["rows"]
        assert (
            stats["queued"] == stats["running"] == stats["failed_rows"] == 0
            and stats["steered_positions"] > 0
        )


def check_mixed_over_plain(out: dict, engines: set[str], levels: set[str]) -> None:
    ratios, meets = out["ratios"]["mixed_over_plain"], out["meets_targets"]["mixed_over_plain"]
    goal = out["targets"]["mixed_over_plain"]
    assert set(ratios) == set(meets) == engines
    for engine, by_level in ratios.items():
        assert set(by_level) == set(meets[engine]) == levels
        for level, ratio in by_level.items():
            assert ratio > 0 and meets[engine][level] == (ratio >= goal)


def test_bench_serve_reports_ratios(tmp_path, chatml_tokenizer):
    save_tiny_model(tmp_path / "model", chatml_tokenizer, n_layers=3)
    out = bench_serve("--model", str(tmp_path / "model"), "--d-sae", "64", "--new-tokens", "4",
                      "--requests-per-client", "2", "--repeats", "2", "--concurrency", "1,3")  # fmt: skip
    results = out["results"]
    assert set(results) == {"hf", "hf_one_at_a_time"}
    assert {level: set(loads) for level, loads in results["hf"].items()} == {"c1": LOADS, "c3": LOADS}
    assert {level: set(loads) for level, loads in results["hf_one_at_a_time"].items()} == {"c3": {"mixed"}}
    check_counts(out, per_client=2, repeats=2, new_tokens=4)
    ratios, targets, meets = out["ratios"], out["targets"], out["meets_targets"]
    assert set(ratios) == set(targets) == set(meets) == {"mixed_over_plain", "batched_over_one_at_a_time"}
    check_mixed_over_plain(out, {"hf"}, {"c1", "c3"})
    batched_ratio = ratios["batched_over_one_at_a_time"]
    assert batched_ratio > 0
    assert meets["batched_over_one_at_a_time"] == (batched_ratio >= targets["batched_over_one_at_a_time"])
    single, batched = out["server_stats"]["hf_one_at_a_time"], out["server_stats"]["hf"]
    assert (
        single["rows"] == single["batches"] and single["largest_batch"] == 1 and batched["largest_batch"] <= 3
    )
    assert (
        out["config"]["layer"] == 1
        and out["config"]["concurrency"] == [1, 3]
        and out["config"]["engine"] == "hf"
    )
    result = CliRunner().invoke(main, ["bench", "serve", "--concurrency", "1,x"])
    assert result.exit_code != 0 and "comma-separated integers" in result.output


def test_bench_serve_both_engines(tmp_path, chatml_tokenizer):
    """A real vLLM server from `.venv-vllm` beside the HF ones (few tokens, one repeat: the JSON, not speed)."""
    save_tiny_model(tmp_path / "model", chatml_tokenizer, n_layers=2, d_model=256)  # head size 64 for vLLM
    out = bench_serve("--model", str(tmp_path / "model"), "--engine", "both", "--d-sae", "64", "--new-tokens", "4",
                      "--requests-per-client", "1", "--repeats", "1", "--concurrency", "1,2")  # fmt: skip
    results = out["results"]
    assert set(results) == {"hf", "vllm", "hf_one_at_a_time"}
    assert {level: set(loads) for level, loads in results["vllm"].items()} == {"c1": LOADS, "c2": LOADS}
    check_counts(out, per_client=1, repeats=1, new_tokens=4)
    ratios = out["ratios"]
    assert set(ratios) == {"mixed_over_plain", "batched_over_one_at_a_time", "vllm_over_hf"}
    assert set(out["targets"]) == {"mixed_over_plain", "batched_over_one_at_a_time"}  # no goal for vLLM ÷ HF
    check_mixed_over_plain(out, {"hf", "vllm"}, {"c1", "c2"})
    assert set(ratios["vllm_over_hf"]) == LOADS
    for by_level in ratios["vllm_over_hf"].values():
        assert set(by_level) == {"c1", "c2"} and min(by_level.values()) > 0


def test_bench_serve_vllm_needs_its_python(tmp_path, chatml_tokenizer):
    save_tiny_model(tmp_path / "model", chatml_tokenizer, n_layers=2)
    # a Python without vLLM: its server exits at once, and the error quotes why
    args = [
        "bench",
        "serve",
        "--model",
        str(tmp_path / "model"),
        "--engine",
        "vllm",
        "--vllm-python",
        sys.executable,
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "exited with code 1" in result.output
    assert "--engine vllm needs vLLM in this environment" in result.output
    missing = tmp_path / "no-venv" / "bin" / "python"
    result = CliRunner().invoke(main, ["bench", "serve", "--engine", "vllm", "--vllm-python", str(missing)])
    assert result.exit_code == 1 and f"{missing} is not there: run `make vllm-venv`" in result.output
    result = CliRunner().invoke(main, ["bench", "serve", "--vllm-python", str(missing)])
    assert result.exit_code == 2 and "--vllm-python is for --engine vllm or both" in result.output
    result = CliRunner().invoke(main, ["bench", "serve", "--soak", "--engine", "vllm"])
    assert result.exit_code == 2 and "--engine: not an option of bench serve --soak" in result.output

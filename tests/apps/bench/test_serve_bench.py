"""`fast-steer bench serve` on a tiny saved model: its JSON holds every figure, each consistent with the load it
sent, with the servers that took it and with the targets."""

from __future__ import annotations

import json

from click.testing import CliRunner

from apps.cli import main
from tests.conftest import save_tiny_model


def test_bench_serve_reports_ratios(tmp_path, chatml_tokenizer):
    save_tiny_model(tmp_path / "model", chatml_tokenizer, n_layers=3)
    args = ["bench", "serve", "--model", str(tmp_path / "model"), "--d-sae", "64", "--new-tokens", "4",
            "--requests-per-client", "2", "--repeats", "2", "--concurrency", "1,3"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["results"]) == {"c1", "c3"}
    assert set(out["results"]["c1"]) == {"plain", "mixed"}
    assert set(out["results"]["c3"]) == {"plain", "mixed", "one_at_a_time"}
    for level, clients in (("c1", 1), ("c3", 3)):
        for figures in out["results"][level].values():
            assert figures["requests"] == 2 * 2 * clients and figures["tokens"] == 4 * figures["requests"]
            assert figures["tokens_per_s"] > 0 and 0 < figures["p50_latency_s"] <= figures["p95_latency_s"]
    ratios, targets, meets = out["ratios"], out["targets"], out["meets_targets"]
    assert set(ratios) == set(targets) == set(meets) == {"mixed_over_plain", "batched_over_one_at_a_time"}
    assert set(ratios["mixed_over_plain"]) == set(meets["mixed_over_plain"]) == {"c1", "c3"}
    for level, ratio in ratios["mixed_over_plain"].items():
        assert ratio > 0 and meets["mixed_over_plain"][level] == (ratio >= targets["mixed_over_plain"])
    batched_ratio = ratios["batched_over_one_at_a_time"]
    assert batched_ratio > 0
    assert meets["batched_over_one_at_a_time"] == (batched_ratio >= targets["batched_over_one_at_a_time"])
    # each request went to the server its scenario names; the batched one also took the warm-up request
    single, batched = out["engine"]["one_at_a_time"], out["engine"]["batched"]
    alone = out["results"]["c3"]["one_at_a_time"]["requests"]
    assert single["rows"] == single["batches"] == alone and single["largest_batch"] == 1
    sent = [f["requests"] for lv in out["results"].values() for n, f in lv.items() if n != "one_at_a_time"]
    assert batched["rows"] == 1 + sum(sent) and batched["largest_batch"] <= 3
    for engine in (single, batched):
        assert engine["generated_tokens"] == 4 * engine["rows"] and engine["queued"] == engine["running"] == 0
    assert out["config"]["layer"] == 1 and out["config"]["concurrency"] == [1, 3]
    result = CliRunner().invoke(main, ["bench", "serve", "--concurrency", "1,x"])
    assert result.exit_code != 0 and "comma-separated integers" in result.output

"""`fast-steer bench serve --soak` on a tiny saved model: every request is counted once in its class, nothing
unexpected comes back, the deliberate fault is a 500 with an error id while the requests beside it are answered,
the sampled greedy replies equal their solo runs, and the JSON has every figure."""

from __future__ import annotations

import json
import random

from click.testing import CliRunner

from apps.bench.soak import SHARES, SoakConfig, bad_requests, make_plan
from apps.cli import main
from apps.serve.schemas import Limits
from tests.conftest import save_tiny_model

N, CLIENTS = 60, 8


def test_soak_reports_every_request(tmp_path, chatml_tokenizer):
    save_tiny_model(tmp_path / "model", chatml_tokenizer, n_layers=3)
    args = ["bench", "serve", "--soak", "--model", str(tmp_path / "model"), "--d-sae", "64", "--new-tokens", "6",
            "--requests", str(N), "--clients", str(CLIENTS), "--compared", "12"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {"config", "requests", "answered", "by_kind", "fault", "unexpected", "problems", "greedy_alone",
            "latency_s", "memory", "engine", "health_after", "goals", "meets_goals"} <= set(out)  # fmt: skip
    # every request sent, each counted once, as expected: bad ones 4xx, the fault's the one 5xx
    assert (
        out["requests"]["planned"] == out["requests"]["sent"] == N and not out["requests"]["stopped_by_time"]
    )
    answered = out["answered"]
    assert sum(v for cls in answered.values() for v in cls.values()) == N
    assert out["unexpected"] == 0 and out["problems"] == [], out["problems"]
    assert answered["5xx"] == {"expected": 1, "unexpected": 0}
    kinds = out["by_kind"]
    bad = {k: v for k, v in kinds.items() if k.startswith("bad:")}
    assert sum(v["sent"] for v in bad.values()) == answered["4xx"]["expected"] == round(SHARES["bad"] * N)
    assert kinds["disconnect"]["sent"] == round(SHARES["disconnect"] * N)
    assert answered["200"]["expected"] == N - answered["4xx"]["expected"] - 1
    assert all(v["expected"] == v["sent"] for v in kinds.values())
    # the fault failed its row alone: one failed row, the requests in flight beside it answered as usual
    fault = out["fault"]
    assert fault["status"] == 500 and fault["as_expected"] and fault["index"] == N // 2
    assert (
        fault["in_flight_beside"] > 0 and fault["in_flight_beside_as_expected"] == fault["in_flight_beside"]
    )
    engine = out["engine"]
    assert (
        engine["failed_rows"] == 1 and engine["restarts"] == 0 and engine["running"] == engine["queued"] == 0
    )
    health = out["health_after"]
    assert health["http_status"] == 200 and health["status"] == "ok" and health["failed_rows"] == 1
    # greedy replies under load equal the same requests sent alone
    alone = out["greedy_alone"]
    assert alone["compared"] == 12 and alone["identical"] == 12 and alone["mismatches"] == []
    memory, latency = out["memory"], out["latency_s"]
    assert memory["peak_growth_bytes"] >= max(memory["growth_bytes"], 0) and len(memory["top_growth"]) <= 5
    assert latency["replies"] == sum(kinds[k]["sent"] for k in ("plain", "steered"))
    assert 0 < latency["p50"] <= latency["p95"] <= latency["max"]
    assert out["meets_goals"]["unexpected_5xx"] and out["meets_goals"]["greedy_identical"]
    assert out["config"]["warmup_requests"] == 2 * CLIENTS and out["config"]["limits"]["max_queue"] == CLIENTS


def test_soak_plan_shares_and_bad_kinds():
    limits = Limits(max_new_tokens=8)
    plan = make_plan(200, SoakConfig(new_tokens=8), limits, 1, random.Random(0), fault=True)
    kinds = [p.kind for p in plan]
    assert len(plan) == 200 and kinds.count("fault") == 1 and kinds[100] == "fault"
    assert kinds.count("disconnect") == 20 and sum(k.startswith("bad:") for k in kinds) == 20
    assert {k.removeprefix("bad:") for k in kinds if k.startswith("bad:")} == set(bad_requests(limits, 1))
    assert {p.expect for p in plan if p.kind.startswith("bad:")} == {400, 404}
    assert {p.path for p in plan} == {"/chat/completions", "/completions"}
    assert any(p.stream for p in plan if p.kind in ("plain", "steered"))


def test_soak_options_belong_to_their_mode():
    result = CliRunner().invoke(main, ["bench", "serve", "--requests", "5"])
    assert (
        result.exit_code != 0 and "--requests: not an option of bench serve without --soak" in result.output
    )
    result = CliRunner().invoke(main, ["bench", "serve", "--soak", "--repeats", "2"])
    assert result.exit_code != 0 and "--repeats: not an option of bench serve --soak" in result.output
    result = CliRunner().invoke(main, ["bench", "serve", "--soak", "--new-tokens", "1"])
    assert result.exit_code != 0 and "at least 2 with --soak" in result.output

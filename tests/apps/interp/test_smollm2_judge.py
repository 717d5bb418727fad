"""`fast-steer serve` with SmolLM2 on 127.0.0.1 as the judge of a small `run_interp` (integration): the full
round trip over real HTTP, every answer either scored or counted as a parse failure, the log-prob path
(an expected score wherever a score was read, since the server returns log-probs), and a rerun answered
wholly from the cache (the server generates nothing new)."""

from __future__ import annotations

import httpx
import pytest

from apps.interp.judge import Judge, JudgeConfig
from apps.interp.run import InterpConfig, run_interp
from apps.serve.process import serve_process
from tests.apps.interp.test_run import setup  # noqa: F401  (the module fixture: tiny model, data, SAE)
from train.interp.collect import CollectConfig

pytestmark = pytest.mark.integration

FEATURES = 4


@pytest.fixture(scope="module")
def judge_server(default_model):  # noqa: ARG001  (converts SmolLM2 once, before the server loads it)
    with serve_process("--model", "default", "--served-model-name", "smol", "--device", "cpu") as base:
        yield base


def _config(setup, out, url: str) -> InterpConfig:  # noqa: F811
    _, _, data, sae = setup
    judge = JudgeConfig(url=url, model="smol", cache_dir=out / "judge-cache", backoff_s=0.0, concurrency=4)
    return InterpConfig(sae=str(sae), data=[str(data)], out=out, judge=judge, protocol="fast-paper",
                        features=FEATURES, collect=CollectConfig(instances=30, split="all", model="tiny-llama"))  # fmt: skip


def test_smollm2_judges_over_http_and_reruns_from_the_cache(setup, judge_server, tmp_path):  # noqa: F811
    model, tokenizer, _, _ = setup
    result = run_interp(_config(setup, tmp_path, judge_server), model=model, tokenizer=tokenizer)
    summary = result["summary"]
    scores = [f["fast_paper"] for f in result["features"]]
    assert len(scores) == FEATURES
    assert summary["n_scored"] + summary["n_parse_failures"] == FEATURES
    assert summary["n_parse_failures"] == sum(s["score"] is None for s in scores)
    assert sum(summary["fast_paper"]["histogram"].values()) == summary["n_scored"]
    judge = Judge(_config(setup, tmp_path, judge_server).judge)
    for s in scores:
        record = judge.cached(s["cache_id"])
        assert record["request"]["logprobs_sent"] is True  # the server accepts log-probs
        assert record["response"]["choices"][0]["logprobs"]["content"]  # and returns them
        if s["score"] is not None:
            assert 1.0 <= s["expected_score"] <= 5.0
        else:
            assert s["expected_score"] is None
    assert summary["judge_stats"]["requests"] == FEATURES and summary["judge_stats"]["cache_hits"] == 0

    rows = httpx.get(judge_server + "/health").json()["rows"]
    again = run_interp(_config(setup, tmp_path, judge_server), model=model, tokenizer=tokenizer)
    assert httpx.get(judge_server + "/health").json()["rows"] == rows  # nothing new was generated
    stats = again["summary"]["judge_stats"]
    assert stats["cache_hits"] == stats["requests"] == FEATURES and stats["http_attempts"] == 0
    assert [f["fast_paper"] for f in again["features"]] == scores

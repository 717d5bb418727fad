"""`run_interp` end to end: a tiny Llama, a random JumpReLU SAE, and a scripted judge over real HTTP."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from apps.interp.fake_judge import FakeAnswer, serve_fake_judge
from apps.interp.judge import JudgeConfig
from apps.interp.prompts import EXPLAIN_SYSTEM, RUBRIC_SYSTEM
from apps.interp.run import EXPLANATIONS_FILE, INTERP_FILE, InterpConfig, run_interp
from hub.sae_io import save_sae
from tests.conftest import build_tiny_model, read_conversations
from tests.train.test_interp_collect import random_sae
from train.interp.collect import CollectConfig

KEY = "sk-run-secret-41c2"


def scripted(body):
    system = body["messages"][0]["content"]
    if system == RUBRIC_SYSTEM:
        return FakeAnswer("Score: [[4]] Name: [[chat tokens]]", digit_probs={"4": 0.6, "3": 0.4})
    if system == EXPLAIN_SYSTEM:
        return FakeAnswer("[[the start of a turn]]")
    return FakeAnswer("[[1]]" if "<|im_start|>" in body["messages"][1]["content"] else "[[0]]")


@pytest.fixture(scope="module")
def setup(chatml_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model = build_tiny_model("llama", len(chatml_tokenizer))
    conversations = read_conversations(n=30)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    sae = save_sae(random_sae(model, chatml_tokenizer, conversations, 0), root / "sae")
    return model, chatml_tokenizer, data, sae


def config(setup, out, url: str, features: int = 6) -> InterpConfig:
    _, _, data, sae = setup
    judge = JudgeConfig(url=url, model="scripted", cache_dir=out / "judge-cache", backoff_s=0.0)
    return InterpConfig(
        sae=str(sae),
        data=[str(data)],
        out=out,
        judge=judge,
        protocol="all",
        controls=True,
        features=features,
        collect=CollectConfig(instances=30, split="all", model="tiny-llama"),
    )


def test_run_writes_the_result_files_and_reruns_from_the_cache(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("FAST_STEER_JUDGE_KEY", KEY)
    model, tokenizer, _, _ = setup
    with serve_fake_judge(scripted) as server:
        result = run_interp(config(setup, tmp_path, server.url), model=model, tokenizer=tokenizer)
        hits = server.hits
        again = run_interp(config(setup, tmp_path, server.url), model=model, tokenizer=tokenizer)
        assert server.hits == hits  # the rerun is answered from the cache
    written = json.loads((tmp_path / INTERP_FILE).read_text())
    assert written["features"] == json.loads(json.dumps(again["features"]))
    summary = result["summary"]
    assert set(summary["fast_paper"]) >= {"histogram", "share_4_5", "cdf_3"}
    assert summary["fast_paper"]["share_4_5"]["value"] == 1.0
    assert summary["fast_paper"]["expected_score_mean"] == pytest.approx(3.6)
    assert summary["n_parse_failures"] == 0 and summary["n_scored"] > 0
    for scorer in ("detection", "fuzzing"):
        assert set(summary[scorer]) >= {"balanced_accuracy_median", "iqr", "auroc_median", "share_ge_0_8"}
        assert summary[scorer]["n_unexplained"] == 0 and summary[scorer]["n_features"] == 6
    assert summary["judge_validated"] is False  # a scripted judge scores chimeras 4 as well
    assert "chimera" in summary["controls"]["verdict"]
    settings = result["settings"]
    assert settings["judge"]["model"] == "scripted" and settings["date"]
    assert len(settings["feature_indices"]) == 6 and settings["fast_paper"]["window_radius"] == 32
    feature = result["features"][0]
    assert feature["name"] == "chat tokens" and feature["fast_paper"]["cache_id"]
    assert len(feature["detection"]["cache_ids"]) == feature["detection"]["n_items"] > 0
    assert feature["proxies"]["feature"] == feature["feature"]
    explanations = json.loads((tmp_path / EXPLANATIONS_FILE).read_text())
    assert {e["scorer"] for e in explanations} == {"fast-paper", "detection", "fuzzing"}
    assert set(explanations[0]) == {"feature", "label", "score", "scorer", "judge_model"}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(KEY.encode() not in p.read_bytes() for p in files)


def test_too_many_features_is_refused_before_any_judge_call(setup, tmp_path):
    model, tokenizer, _, _ = setup
    with serve_fake_judge(scripted) as server:
        with pytest.raises(ValueError, match=r"--features 999 is more than the \d+ live features"):
            run_interp(config(setup, tmp_path, server.url, features=999), model=model, tokenizer=tokenizer)
        assert server.hits == 0
    assert not (tmp_path / INTERP_FILE).exists() and not (tmp_path / EXPLANATIONS_FILE).exists()


def test_a_judge_that_never_explains_is_reported_as_such(setup, tmp_path):
    model, tokenizer, _, _ = setup

    def rambling(body):
        return FakeAnswer(
            "The code is correct." if body["messages"][0]["content"] == EXPLAIN_SYSTEM else "[[1]]"
        )

    with serve_fake_judge(rambling) as server:
        cfg = replace(config(setup, tmp_path, server.url, features=3), protocol="detection", controls=False)
        summary = run_interp(cfg, model=model, tokenizer=tokenizer)["summary"]
        assert server.hits == 3  # the explanations only: nothing to classify without one
    detection = summary["detection"]
    assert detection["n_unexplained"] == 3 and detection["n_features"] == 0
    assert detection["balanced_accuracy_median"] is None and summary["n_parse_failures"] == 3


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        ("all", ["fast-paper", "detection", "fuzzing"]),
        ("detection,fast-paper", ["fast-paper", "detection"]),
        ("fuzzing", ["fuzzing"]),
    ],
)
def test_protocol_lists_expand_in_canonical_order(tmp_path, protocol, expected):
    cfg = InterpConfig(
        "sae",
        ["data"],
        tmp_path,
        JudgeConfig("http://127.0.0.1:9", "judge", tmp_path / "cache"),
        protocol=protocol,
    )
    assert cfg.protocols == expected


@pytest.mark.parametrize("protocol", ["", "fast-paper,typo", "rubric"])
def test_an_unknown_protocol_is_refused_naming_the_choices(tmp_path, protocol):
    from steer.errors import ConfigError

    with pytest.raises(ConfigError, match="comma-separated list"):
        InterpConfig(
            "sae",
            ["data"],
            tmp_path,
            JudgeConfig("http://127.0.0.1:9", "judge", tmp_path / "cache"),
            protocol=protocol,
        )

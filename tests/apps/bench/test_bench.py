"""`fast-steer bench steer|train` on a tiny saved model: the JSON they print holds every figure, and bad options
are refused clearly."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from apps.cli import main
from tests.conftest import CHAT_DATA, build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, chatml_tokenizer):
    root = tmp_path_factory.mktemp("bench")
    build_tiny_model("llama", len(chatml_tokenizer), n_layers=3).save_pretrained(root / "model")
    chatml_tokenizer.save_pretrained(root / "model")
    return root / "model"


def _bench(*args: str) -> dict:
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_steer_reports_paired_ratios(model_dir):
    out = _bench("steer", "--model", str(model_dir), "--d-sae", "128", "--topk", "8",
                 "--new-tokens", "4", "--repeats", "2", "--batch-sizes", "1,3")  # fmt: skip
    assert set(out["results"]) == {"batch_1", "batch_3"}
    for key, res in out["results"].items():
        assert set(res) == {"plain", "special_add", "few_feature", "full_sae_all"}
        for name, figures in res.items():
            assert figures["decode_steps"] == 2 * 3, (
                "new_tokens - 1 decode steps per repeat (prefill left out)"
            )
            assert len(figures["generate_seconds"]) == 2
            assert figures["decode_tokens_per_s"] > 0 and figures["generate_tokens_per_s"] > 0
            if name != "plain":
                assert figures["ratio"] > 0 and figures["generate_ratio"] > 0
                assert out["meets_targets"][key][name] == (figures["ratio"] >= out["targets"][name])


def test_bench_steer_rejects_a_prefill_only_run(model_dir):
    result = CliRunner().invoke(main, ["bench", "steer", "--model", str(model_dir), "--new-tokens", "1"])
    assert result.exit_code != 0
    assert "at least 2" in result.output


def test_bench_train_reports_rates_and_memory(model_dir):
    out = _bench("train", "--model", str(model_dir), "--data", str(CHAT_DATA), "--layer", "1",
                 "--expansion", "2", "--batch-size", "64", "--tokens", "1500", "--buffer-tokens", "512",
                 "--repeats", "1")  # fmt: skip
    for key in ("bare_forward_tokens_per_s", "harvest_tokens_per_s", "bare_sae_step_tokens_per_s",
                "sequential_limit_tokens_per_s", "end_to_end_tokens_per_s", "peak_memory_mib"):  # fmt: skip
        assert out[key] > 0, key
    assert 0 <= out["padding_share"] < 1
    assert out["end_to_end_tokens_trained"] >= 1500
    assert out["harvested_tokens"] >= out["end_to_end_tokens_trained"], (
        "the limit covers every harvested token"
    )
    assert out["end_to_end_ratio_to_limit"] == pytest.approx(
        out["end_to_end_tokens_per_s"] / out["sequential_limit_tokens_per_s"]
    )
    assert out["peak_over_estimate"] == pytest.approx(out["peak_memory_mib"] / out["memory_estimate_mib"])
    assert out["cache_tokens"] >= out["end_to_end_tokens_trained"] and out["device"] == "cpu"
    for key in ("cache_harvest_tokens_per_s", "cache_read_tokens_per_s", "cached_training_loop_tokens_per_s"):
        assert out[key] > 0, key
    assert out["cached_training_ratio_to_bare_step"] == pytest.approx(
        out["cached_training_loop_tokens_per_s"] / out["bare_sae_step_tokens_per_s"]
    )


def test_bench_train_rejects_a_bad_budget(model_dir):
    result = CliRunner().invoke(main, ["bench", "train", "--model", str(model_dir), "--tokens", "0"])
    assert result.exit_code != 0
    assert "must be positive" in result.output


def test_bench_eval_compares_with_two_bare_forwards(model_dir):
    out = _bench("eval", "--model", str(model_dir), "--device", "cpu", "--data", str(CHAT_DATA), "--layer", "1",
                 "--conversations", "6", "--repeats", "2", "--expansion", "2")  # fmt: skip
    assert out["conversations"] == 6 and out["layer"] == 1 and out["device"] == "cpu"
    assert "random" in out["sae"] and out["sae"].startswith("standard 64x128")
    assert out["real_tokens"] > 0 and 0 <= out["padding_share"] < 1
    assert len(out["bare_seconds_all"]) == len(out["eval_seconds_all"]) == 2
    assert out["eval_tokens_per_s"] > 0 and out["two_bare_forwards_tokens_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["eval_tokens_per_s"] / out["two_bare_forwards_tokens_per_s"])
    assert out["meets_target"] == (out["ratio"] >= out["target"] == 0.7)


def test_bench_eval_rejects_a_bad_layer(model_dir):
    result = CliRunner().invoke(main, ["bench", "eval", "--model", str(model_dir), "--layer", "7"])
    assert result.exit_code != 0
    assert "--layer 7 out of range" in result.output

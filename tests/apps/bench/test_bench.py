"""`fast-steer bench steer|train|eval` on a tiny saved model: the JSON they print holds every figure, each
consistent with the others and with the targets, and bad options are refused clearly. How the figures respond
to what they measure is checked on given timings, never against the clock."""

from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner

from apps.bench.steer import TARGETS, _summarise
from apps.bench.train import _memory_estimate, compare_with_saelens, median_run
from apps.cli import main
from tests.conftest import CHAT_DATA, build_tiny_model, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, chatml_tokenizer):
    root = tmp_path_factory.mktemp("bench")
    save_tiny_model(root / "model", chatml_tokenizer, n_layers=3)
    return root / "model"


def _bench(*args: str) -> dict:
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_steer_reports_paired_ratios(model_dir):
    out = _bench("steer", "--model", str(model_dir), "--d-sae", "128", "--topk", "8",
                 "--new-tokens", "4", "--repeats", "2", "--batch-sizes", "1,3")  # fmt: skip
    assert set(out["results"]) == set(out["meets_targets"]) == {"batch_1", "batch_3"}
    assert out["targets"] == TARGETS
    for key, res in out["results"].items():
        assert set(res) == {"plain", *out["targets"]}, "every steered case has a target"
        for name, figures in res.items():
            assert figures["decode_steps"] == 2 * 3, (
                "new_tokens - 1 decode steps per repeat (prefill left out)"
            )
            assert len(figures["generate_seconds"]) == 2
            assert figures["decode_tokens_per_s"] > 0 and figures["generate_tokens_per_s"] > 0
            if name != "plain":
                assert figures["ratio"] > 0 and figures["generate_ratio"] > 0
                assert out["meets_targets"][key][name] == (figures["ratio"] >= out["targets"][name])


def _case(step: float, repeats: int = 3, steps: int = 3, new_tokens: int = 4) -> tuple[list, list]:
    """Whole-generate times and decode-step times of one case whose every step takes `step` seconds."""
    return [step * new_tokens] * repeats, [[step] * steps for _ in range(repeats)]


def _summary(**cases: tuple[list, list]) -> dict:
    return _summarise({n: c[0] for n, c in cases.items()}, {n: c[1] for n, c in cases.items()}, 2, 4)


def test_bench_steer_ratio_falls_with_the_work_a_case_adds():
    out = _summary(plain=_case(0.01), free=_case(0.01), double=_case(0.02), tenfold=_case(0.1))
    assert out["free"]["ratio"] == pytest.approx(1) and out["free"]["generate_ratio"] == pytest.approx(1)
    assert out["plain"]["decode_tokens_per_s"] == pytest.approx(2 * out["double"]["decode_tokens_per_s"])
    for name in ("double", "tenfold"):
        assert out[name]["ratio"] == pytest.approx(out[name]["generate_ratio"])
    assert out["free"]["ratio"] > out["double"]["ratio"] > out["tenfold"]["ratio"] > 0
    assert out["double"]["ratio"] == pytest.approx(0.5), "twice the time per step: half plain's rate"
    assert "ratio" not in out["plain"]


def test_bench_steer_ratio_shrugs_off_slow_phases_and_single_slow_steps():
    plain, double = _case(0.01), _case(0.02)
    for times, steps in (plain, double):  # the machine is 10x slower during the second repeat, for every case
        times[1] *= 10
        steps[1] = [s * 10 for s in steps[1]]
    plain[1][0][0] = 5.0  # and one plain step of the first repeat stalls
    out = _summary(plain=plain, double=double)
    assert out["double"]["ratio"] == pytest.approx(0.5) and out["double"]["generate_ratio"] == pytest.approx(
        0.5
    )


def test_bench_steer_rejects_a_prefill_only_run(model_dir):
    result = CliRunner().invoke(main, ["bench", "steer", "--model", str(model_dir), "--new-tokens", "1"])
    assert result.exit_code != 0
    assert "at least 2" in result.output


def test_bench_train_reports_rates_and_memory(model_dir):
    out = _bench("train", "--model", str(model_dir), "--data", str(CHAT_DATA), "--layer", "1",
                 "--expansion", "2", "--batch-size", "64", "--tokens", "1500", "--buffer-tokens", "512",
                 "--repeats", "2", "--no-autocast")  # fmt: skip
    assert out["end_to_end_by_setting"]["float32"]["runs"] == 2, "--repeats whole runs, medians"
    for key in ("bare_forward_tokens_per_s", "harvest_tokens_per_s", "bare_sae_step_tokens_per_s",
                "sequential_limit_tokens_per_s", "end_to_end_tokens_per_s", "peak_memory_mib"):  # fmt: skip
        assert out[key] > 0, key
    assert 0 <= out["padding_share"] < 1
    assert out["end_to_end_tokens_trained"] >= 1500
    assert out["harvested_tokens"] >= out["end_to_end_tokens_trained"], (
        "the limit covers every harvested token"
    )
    limit = out["sequential_limit_tokens_per_s"]
    assert limit < out["bare_sae_step_tokens_per_s"] and limit < out["bare_forward_tokens_per_s"], (
        "harvesting then training, one after the other, is slower than either alone"
    )
    forward, steps = out["bare_forward_tokens_per_s_by_setting"], out["bare_sae_step_tokens_per_s_by_setting"]
    assert {"float32 weights", "bfloat16 weights", "float32 weights, bfloat16 autocast"} == forward.keys()
    assert steps.keys() == {"float32", "autocast"}
    # the limit is built from the fastest setting of each, and says which
    assert out["bare_forward_tokens_per_s"] == forward[out["bare_forward_setting"]] == max(forward.values())
    assert out["bare_sae_step_tokens_per_s"] == steps[out["bare_sae_step_setting"]] == max(steps.values())
    assert out["end_to_end_setting"] == "float32" and out["end_to_end_by_setting"].keys() == {"float32"}
    assert 0 < out["end_to_end_harvest_share"] < 1
    # the runs read their pools' ids back from the token cache, which the warm-up filled
    assert out["end_to_end_by_setting"]["float32"]["token_cache"] == {"hits": 1, "misses": 0}
    # each repeat's run over the limit of its own bare measurements, taken right after it; the median of those
    by_repeat = out["end_to_end_ratio_to_limit_by_repeat"]
    assert len(by_repeat) == 2 and all(r > 0 for r in by_repeat)
    assert out["end_to_end_ratio_to_limit"] == pytest.approx(statistics.median(by_repeat))
    runs, limits = out["end_to_end_tokens_per_s_by_repeat"], out["sequential_limit_tokens_per_s_by_repeat"]
    assert by_repeat == pytest.approx([run / lim for run, lim in zip(runs, limits, strict=True)])
    assert out["peak_memory_covers"] == "the end-to-end run"
    assert out["memory_estimate_mib"] / 2 <= out["peak_memory_mib"] <= 2 * out["memory_estimate_mib"], (
        "the estimate is within a factor 2 of the measured peak"
    )
    assert out["cache_tokens"] >= out["end_to_end_tokens_trained"] and out["device"] == "cpu"
    for key in ("cache_harvest_tokens_per_s", "cache_read_tokens_per_s", "cached_training_loop_tokens_per_s"):
        assert out[key] > 0, key
    # against the bare step in the setting the cached run trains in (here float32), not the fastest setting
    assert out["cached_training_ratio_to_bare_step"] == pytest.approx(
        out["cached_training_loop_tokens_per_s"] / steps[out["end_to_end_setting"]]
    )


def test_bench_train_compile_times_the_compiled_forward_too(model_dir):
    out = _bench("train", "--model", str(model_dir), "--data", str(CHAT_DATA), "--layer", "1",
                 "--expansion", "2", "--batch-size", "64", "--tokens", "640", "--buffer-tokens", "256",
                 "--repeats", "1", "--no-autocast", "--compile")  # fmt: skip
    forward = out["bare_forward_tokens_per_s_by_setting"]
    own = f"{out['model_dtype']} weights"
    assert out["compile"] is True and {own, f"{own}, compiled"} <= forward.keys()
    one_off = out["bare_forward_one_off_seconds_by_setting"]
    assert (
        one_off.keys() == {f"{own}, compiled"} and one_off[f"{own}, compiled"] > 0
    )  # the compile's own cost
    trained = out["end_to_end_tokens_trained"]
    seconds = {name: trained / rate + one_off.get(name, 0.0) for name, rate in forward.items()}
    assert out["bare_forward_setting"] == min(seconds, key=seconds.get), (
        "the limit takes the quickest forward of the trained tokens, a compiled one with its compile"
    )
    limit = trained / (seconds[out["bare_forward_setting"]] + trained / out["bare_sae_step_tokens_per_s"])
    assert out["sequential_limit_tokens_per_s"] == pytest.approx(limit)
    assert trained >= 640 and out["end_to_end_tokens_per_s"] > 0
    # one repeat: its run over its own limit
    assert out["end_to_end_ratio_to_limit"] == pytest.approx(out["end_to_end_tokens_per_s"] / limit)


def test_bench_train_compares_the_best_of_each_tool():
    ours = {"end_to_end_tokens_per_s": 300.0,
            "end_to_end_by_setting": {"float32": {"tokens_per_s": 200.0}, "autocast": {"tokens_per_s": 300.0}}}  # fmt: skip
    saelens = {"float32": {"tokens_per_s": 100.0}, "autocast": {"tokens_per_s": 250.0}}
    out = compare_with_saelens(ours, saelens)
    assert out["saelens_best_setting"] == "autocast" and out["saelens_best_tokens_per_s"] == 250.0
    assert out["end_to_end_over_saelens"] == pytest.approx(1.2), "the best of ours over the best of theirs"
    assert out["end_to_end_over_saelens_by_setting"] == pytest.approx({"float32": 2.0, "autocast": 1.2})


def test_bench_train_vs_saelens_without_its_venv_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .venv-saelens here
    result = CliRunner().invoke(main, ["bench", "train", "--vs-saelens", "--model", str(tmp_path / "none")])
    assert result.exit_code != 0
    assert "make saelens-venv" in result.output, "named before the (missing) model is even looked for"


def test_median_run_takes_medians_the_highest_peak_and_flags_all_runs_share():
    runs = [
        {
            "tokens_per_s": 100.0,
            "seconds": 10.0,
            "peak_memory_mib": 900.0,
            "tokens": 4096,
            "peak_window": True,
        },
        {
            "tokens_per_s": 300.0,
            "seconds": 3.0,
            "peak_memory_mib": 1000.0,
            "tokens": 4096,
            "peak_window": False,
        },
        {
            "tokens_per_s": 200.0,
            "seconds": 5.0,
            "peak_memory_mib": 950.0,
            "tokens": 4096,
            "peak_window": True,
        },
    ]
    assert median_run(runs, maxima=("peak_memory_mib",)) == {
        "tokens_per_s": 200.0, "seconds": 5.0, "peak_memory_mib": 1000.0, "tokens": 4096, "peak_window": False,
        "runs": 3,
    }  # fmt: skip
    assert median_run(runs[:1])["runs"] == 1 and median_run(runs[:2])["tokens_per_s"] == 200.0


def test_bench_train_memory_estimate_grows_with_the_sae_width(chatml_tokenizer):
    from train.run_config import StreamSettings

    model = build_tiny_model("llama", len(chatml_tokenizer), n_layers=3)
    narrow, wide = (_memory_estimate(model, StreamSettings(), 64, e, 64, 500.0, 20.0) for e in (2, 8))
    width_parts = {"saes_params_grads_adam", "step_activations"}
    for part in width_parts:
        assert 3.9 < wide[part] / narrow[part] <= 4, f"{part}: 4x the features, 4x the memory"
    assert {p: narrow[p] for p in narrow.keys() - width_parts} == {
        p: wide[p] for p in wide.keys() - width_parts
    }
    assert narrow["runtime_baseline"] == 500.0 and narrow["corpus"] == 20.0 and narrow["model"] > 0


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
    assert (out["ratio"] > 1) == (out["eval_tokens_per_s"] > out["two_bare_forwards_tokens_per_s"])
    assert out["target"] == 0.7 and out["meets_target"] == (out["ratio"] >= out["target"])


def test_bench_eval_rejects_a_bad_layer(model_dir):
    result = CliRunner().invoke(main, ["bench", "eval", "--model", str(model_dir), "--layer", "7"])
    assert result.exit_code != 0
    assert "--layer 7 out of range" in result.output

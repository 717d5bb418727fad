"""The main job (`fast-steer run`) on the default model with a tiny token budget: the first run trains,
evaluates and discovers features into its cache folder; the second reuses all of it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.demo.spec_io import build_interventions
from apps.jobs.main_job import MainJobConfig, build_main_backend, job_dir, run_config, run_main_job
from tests.conftest import CHAT_DATA

pytestmark = pytest.mark.integration

DATA = CHAT_DATA / "taskmaster4_coffee.jsonl"  # a small file: the job loads it three times
TINY = [
    "--data",
    str(DATA),
    "--tokens",
    "2048",
    "--batch-size",
    "1024",
    "--expansion",
    "2",
    "--conversations",
    "4",
]


@pytest.mark.skipif(not DATA.is_file(), reason="needs the shared chat data")
def test_main_job_trains_then_reuses_the_cached_sae(tmp_path):
    result = CliRunner().invoke(main, ["run", "--no-demo", "--cache-dir", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.output
    assert "[2/5] training a FAST jumprelu SAE" in result.output
    assert "explained variance" in result.output  # the evaluation table is printed
    assert "mean max act" in result.output  # and the feature table
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in ("cfg.json", "sae_weights.safetensors", "eval.json", "features.json", "train_summary.json"):
        assert (folder / name).is_file(), f"{name} missing from {folder}"
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.15.hook_resid_post"
    assert meta["exclude_first_token"] is True and meta["method"] == "FAST"
    stamp = (folder / "sae_weights.safetensors").stat().st_mtime_ns

    # Second run, same settings, from Python: nothing is retrained or recomputed.
    cfg = MainJobConfig(
        data=str(DATA),
        tokens=2048,
        batch_size=1024,
        expansion=2,
        eval_conversations=4,
        feature_conversations=4,
        sample_conversations=4,
        cache=tmp_path,
    )
    lines: list[str] = []
    job, demo_sae, sample = run_main_job(cfg, echo=lines.append)
    assert job.reused_sae and job.sae_dir == folder
    assert (folder / "sae_weights.safetensors").stat().st_mtime_ns == stamp
    assert any("reusing the SAE" in line for line in lines)
    assert any("evaluation (cached" in line for line in lines)
    assert any("features (cached" in line for line in lines)
    assert job.metrics == json.loads((folder / "eval.json").read_text())["metrics"]
    # Another token budget is another cache entry.
    four, two = (MainJobConfig(tokens=n, batch_size=1024, expansion=2, cache=tmp_path) for n in (4096, 2048))
    assert job_dir(four, run_config(four, "d"), "x") != job_dir(two, run_config(two, "d"), "x")

    # `fast-steer train` writes the same metadata keys, with real statistics, as the main job.
    trained = tmp_path / "trained"
    result = CliRunner().invoke(main, ["train", "--layer", "15", "--data", str(DATA), "--tokens", "2048",
                                       "--batch-size", "1024", "--expansion", "2", "--buffer-tokens", "2048",
                                       "--out", str(trained), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    other = json.loads((trained / "cfg.json").read_text())["metadata"]
    assert set(other) == set(meta), set(other) ^ set(meta)
    for m in (meta, other):
        assert m["training_tokens"] == 2048 and m["expansion_factor"] == 2
        assert m["sequences"] > 0 and m["tokens_yielded"] == 2048 and m["padding_share"] < 0.5
    assert (meta["created_by"], other["created_by"]) == ("fast-steer run", "fast-steer train")

    # The demo opens on this SAE with its strongest special-token feature preselected.
    backend = build_main_backend(cfg, demo_sae, sample)
    strongest = max(job.features, key=lambda f: f.mean_max)
    assert [(r.feature, r.op, r.positions) for r in backend.preselect] == [
        (strongest.feature, "add", "special")
    ]
    # Its strength is on the study's scale: it adds preselect_strength % of the special-position norm R.
    assert backend.preselect[0].strength == cfg.preselect_strength
    (spec,) = build_interventions(backend.default_sae, backend.preselect)
    assert spec.edits[0].strength == pytest.approx(
        cfg.preselect_strength / 100 * backend.default_sae.residual_norm
    )
    assert backend.feature_rows(None)[0][1] == job.features[0].feature

"""The reproduce experiment's plumbing on a tiny model: six SAEs, one table, reuse and resume."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CHAT_DATA, PRETRAIN_DATA, build_tiny_model, read_conversations
from train.experiment import EVAL_FILE, ReproduceConfig, plan_runs, reproduce
from train.results_table import ResultRow, check_metrics, markdown_table, ratio_table


def write_small_data(tmp_path, n_chats: int = 60, n_docs: int = 6):
    """Small chat and pretraining files cut from the shared data (tests only; not copied into the repo)."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in read_conversations(n=n_chats)))
    pre = tmp_path / "pretrain.jsonl"
    with open(PRETRAIN_DATA / "c4_en_sample.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(next(fh))["text"] for _ in range(n_docs)]
    pre.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return chat, pre


def tiny_config(tmp_path, chat, pre, **overrides) -> ReproduceConfig:
    values = dict(
        out=tmp_path / "exp",
        model="tiny-llama",
        layer=1,
        tokens=512,
        chat_data=[str(chat)],
        pretrain_data=[str(pre)],
        expansion=2,
        batch_size=128,
        buffer_tokens=512,
        eval_conversations=4,
        held_out_fraction=0.2,
        max_len=2048,
    )
    values.update(overrides)
    return ReproduceConfig(**values)


@pytest.fixture
def tiny(chatml_tokenizer):
    return build_tiny_model("llama", len(chatml_tokenizer)), chatml_tokenizer


def test_reproduce_six_saes_table_and_reuse(tmp_path, tiny):
    model, tok = tiny
    chat, pre = write_small_data(tmp_path)
    cfg = tiny_config(tmp_path, chat, pre)
    first = reproduce(cfg, model, tok, progress=False)
    assert first.trained == ["fast/all", "bt-f/all", "bt-p/all"]
    assert {(r.method, r.arch) for r in first.rows} == {
        (m, a) for m in ("fast", "bt-f", "bt-p") for a in ("standard", "jumprelu")
    }
    for row in first.rows:
        assert row.tokens == 512
        assert all(math.isfinite(row.metrics[k]) for k in ("mse", "log2_mse", "l0", "delta_lm_loss"))
        assert row.metrics["log2_mse"] == pytest.approx(math.log2(row.metrics["mse"]))
    saved = json.loads(first.paths["json"].read_text())
    assert len(saved["rows"]) == 6 and saved["layer"] == 1
    md = first.paths["markdown"].read_text()
    assert all(label in md for label in ("FAST standard", "BT(F) jumprelu", "BT(P) standard", "log2 MSE_st"))
    assert "| all | FAST standard | " in md.split("by token type")[1]  # the per-token-type table follows
    assert first.paths["plot"].stat().st_size > 5000
    # every SAE was evaluated on the same frozen held-out conversations
    assert len((cfg.out / "heldout.jsonl").read_text().splitlines()) == 4
    sizes = {json.loads((Path(r.sae_dir) / EVAL_FILE).read_text())["n_sequences"] for r in first.rows}
    assert sizes == {4}

    weights = {d: load_file(d / "sae_weights.safetensors") for run in plan_runs(cfg) for d in run.sae_dirs}
    second = reproduce(cfg, model, tok, progress=False)
    assert second.trained == [] and second.evaluated == []
    assert [r.metrics for r in second.rows] == [r.metrics for r in first.rows]
    for folder, tensors in weights.items():
        again = load_file(folder / "sae_weights.safetensors")
        assert all(torch.equal(tensors[k], again[k]) for k in tensors)


def test_reproduce_finishes_only_what_is_missing(tmp_path, tiny):
    model, tok = tiny
    chat, pre = write_small_data(tmp_path)
    cfg = tiny_config(tmp_path, chat, pre, methods=("fast", "bt-f"), archs=("standard",), tokens=384)
    reproduce(cfg, model, tok, progress=False)
    fast_run, bt_run = plan_runs(cfg)
    before = load_file(bt_run.sae_dirs[0] / "sae_weights.safetensors")
    (fast_run.sae_dirs[0] / EVAL_FILE).unlink()  # evaluated no more: re-evaluate only
    (bt_run.sae_dirs[0] / "sae_weights.safetensors").unlink()  # killed before saving: train again
    again = reproduce(cfg, model, tok, progress=False)
    assert again.trained == ["bt-f/all"]
    assert again.evaluated == ["fast/all", "bt-f/all"]
    after = load_file(bt_run.sae_dirs[0] / "sae_weights.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # same seeds, same data order: same SAE
    timing = json.loads((bt_run.run_dir / "timing.json").read_text())
    assert timing["train_s"] > 0 and timing["eval_s"] > 0


def test_reproduce_refuses_other_settings_in_same_folder(tmp_path, tiny):
    chat, pre = write_small_data(tmp_path, n_chats=30)
    cfg = tiny_config(tmp_path, chat, pre, methods=("fast",), archs=("standard",), tokens=256)
    reproduce(cfg, *tiny, progress=False)
    with pytest.raises(ValueError, match="other settings.*tokens: saved 256, now 512"):
        reproduce(
            tiny_config(tmp_path, chat, pre, methods=("fast",), archs=("standard",)), *tiny, progress=False
        )
    # a changed optimisation setting (e.g. a retuned preset) is caught too, instead of training new folders
    changed = tiny_config(
        tmp_path, chat, pre, methods=("fast",), archs=("standard",), tokens=256, l1_coefficient=3.0
    )
    with pytest.raises(ValueError, match="train_config: saved"):
        reproduce(changed, *tiny, progress=False)


def test_reproduce_without_fast_scales_on_the_first_method(tmp_path, tiny):
    chat, pre = write_small_data(tmp_path, n_chats=30)
    cfg = tiny_config(tmp_path, chat, pre, methods=("bt-p",), archs=("standard",), tokens=256)
    result = reproduce(cfg, *tiny, progress=False)
    assert result.trained == ["bt-p/all"] and not (cfg.out / "cache" / "fast").exists()
    scale = json.loads((cfg.out / "activation_scale.json").read_text())
    assert scale["estimated_on"] == "bt-p cache, variant all" and scale["norm_scaling_factor"] > 0


def test_config_errors_are_specific(tmp_path):
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        ReproduceConfig(out=tmp_path, methods=("fast", "bt-x"), chat_data=[str(CHAT_DATA)])
    # data is checked when it is recorded, not when a moved experiment's settings are read back
    with pytest.raises(FileNotFoundError, match="pretraining data not found: /nope"):
        ReproduceConfig(out=tmp_path, chat_data=[str(CHAT_DATA)], pretrain_data=["/nope"]).data_refs()


def test_moved_experiment_reuses_its_runs_and_checks_its_data(tmp_path, tiny):
    """experiment.json holds no absolute path of its folder: a copy elsewhere (the original deleted) reuses
    every run; data is accepted wherever it lies when its hash matches, refused naming both hashes if not;
    another dtype than the harvest's is refused; the results header says what each cache's manifest says."""
    from train.experiment import load_config, steering_sae

    chat, pre = write_small_data(tmp_path, n_chats=30)
    first_place = tmp_path / "a" / "exp"
    (first_place / "data").mkdir(parents=True)
    inside = shutil.copy(pre, first_place / "data" / "pretrain.jsonl")  # data inside the folder: relative
    cfg = tiny_config(
        tmp_path, chat, inside, out=first_place, methods=("fast",), archs=("standard",), tokens=256
    )
    first = reproduce(cfg, *tiny, progress=False)
    text = (first_place / "experiment.json").read_text()
    record = json.loads(text)
    assert (
        str(first_place) not in text and record["format_version"] == 2 and record["model_dtype"] == "float32"
    )
    assert record["pretrain_data"] == [{"path": "data/pretrain.jsonl", "sha256": _sha256(pre)}]
    assert record["chat_data"] == [{"path": str(chat), "sha256": _sha256(chat)}]

    moved = tmp_path / "b" / "exp"
    shutil.copytree(first_place, moved)
    shutil.rmtree(tmp_path / "a")
    assert load_config(moved).pretrain_data == [str(moved / "data" / "pretrain.jsonl")]
    again = reproduce(replace(cfg, out=moved, pretrain_data=[str(moved / "data" / "pretrain.jsonl")]), *tiny,
                      progress=False)  # fmt: skip
    assert again.trained == [] and again.evaluated == []
    assert [r.metrics for r in again.rows] == [r.metrics for r in first.rows]
    assert all(Path(r.sae_dir).is_relative_to(moved) for r in again.rows)
    assert steering_sae(moved, "fast") == plan_runs(load_config(moved))[0].run_dir
    moved_cfg = load_config(moved)

    elsewhere = shutil.copy(chat, tmp_path / "renamed.jsonl")  # the same data at another path: accepted
    assert reproduce(replace(moved_cfg, chat_data=[str(elsewhere)]), *tiny, progress=False).trained == []
    Path(elsewhere).write_text(Path(elsewhere).read_text().replace("a", "b", 1))
    message = (
        rf"chat data: '{elsewhere}' has sha256 {_sha256(elsewhere)}, but the experiment was run on '{chat}' "
        rf"with sha256 {_sha256(chat)} \(changed data"
    )
    with pytest.raises(ValueError, match=message):
        reproduce(replace(moved_cfg, chat_data=[str(elsewhere)]), *tiny, progress=False)
    with pytest.raises(ValueError, match="harvested with the model in float32, but bfloat16 is requested"):
        reproduce(replace(moved_cfg, model_dtype="bfloat16"), *tiny, progress=False)

    # the header reports the cache's manifest, not this machine (a manifest written on a GPU says so)
    manifest_path = moved / "cache" / "fast" / "harvest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["model_dtype"] == "float32" and manifest["device"] == "cpu"
    manifest.update(device="cuda (NVIDIA H100 80GB HBM3)", versions={"torch": "2.11.0+cu128"})
    manifest_path.write_text(json.dumps(manifest))
    payload = json.loads(reproduce(moved_cfg, *tiny, progress=False).paths["json"].read_text())
    expected = "model in float32; device cuda (NVIDIA H100 80GB HBM3); stored as bfloat16; torch 2.11.0+cu128"
    assert payload["FAST harvest"] == expected
    from apps.evaluation.results_doc import write_doc

    assert (
        f"- FAST harvest: `{expected}`"
        in write_doc(moved, None, tmp_path / "docs" / "results.md").read_text()
    )


def test_older_experiment_json_still_loads_and_is_upgraded(tmp_path, tiny):
    """An experiment.json of format 1 (absolute paths, model_dtype auto) loads from a moved folder; a rerun with
    its settings reuses the runs and rewrites it in format 2, with the dtype its caches were harvested in."""
    from train.experiment import load_config

    chat, pre = write_small_data(tmp_path, n_chats=30)
    cfg = tiny_config(tmp_path, chat, pre, methods=("bt-p",), archs=("standard",), tokens=256)
    reproduce(cfg, *tiny, progress=False)
    record = json.loads((cfg.out / "experiment.json").read_text())
    old = {k: v for k, v in record.items() if k != "format_version"}
    old.update(out="/somewhere/else/exp", chat_data=[str(chat)], pretrain_data=[str(pre)], model_dtype="auto")
    (cfg.out / "experiment.json").write_text(json.dumps(old))
    loaded = load_config(cfg.out)
    assert loaded.out == cfg.out and loaded.chat_data == [str(chat)] and loaded.model_dtype == "auto"
    assert reproduce(loaded, *tiny, progress=False).trained == []
    assert json.loads((cfg.out / "experiment.json").read_text()) == record
    old["pretrain_data"] = [str(tmp_path / "other.jsonl")]
    (cfg.out / "experiment.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="without content hashes.*pass the recorded path"):
        reproduce(loaded, *tiny, progress=False)


def _sha256(path) -> str:
    from train.data import source_sha256

    return source_sha256(path, "chat")


def _row(method: str, mse: float, mse_st: float, arch: str = "standard") -> ResultRow:
    metrics = dict.fromkeys(
        ("l0", "explained_variance", "dead_share", "delta_lm_loss", "delta_lm_loss_pct"), 0.5
    )
    metrics.update(mse=mse, log2_mse=math.log2(mse), mse_st=mse_st, log2_mse_st=math.log2(mse_st))
    metrics["log2_mse_st_after_first"] = math.log2(mse_st)
    return ResultRow(method, arch, metrics, sae_dir=f"/x/{method}")


def test_tables_order_methods_and_compute_ratios():
    rows = [_row("bt-p", 4.0, 32.0), _row("fast", 2.0, 2.0), _row("bt-f", 3.0, 4.0)]
    md = markdown_table(rows).splitlines()
    assert [line.split("|")[2].strip() for line in md[2:]] == [
        "FAST standard",
        "BT(F) standard",
        "BT(P) standard",
    ]
    assert "5.1985" in md[4]  # the paper's BT(P) reference sits beside ours
    jump = markdown_table([_row("fast", 2.0, 2.0, "jumprelu")]).splitlines()[2]
    assert "-9.7604" in jump and "0.6468" not in jump  # each architecture's own reference value
    ratios = ratio_table(rows)
    assert "| all | standard | BT(F) | 1.500 | 2.000 | 1.000 |" in ratios
    assert "| all | standard | BT(P) | 2.000 | 16.000 | 1.000 |" in ratios
    with pytest.raises(KeyError, match="eval.json lacks metric.*delta_lm_loss_pct"):
        check_metrics({"mse": 1.0}, "eval.json")


def test_reproduce_variants_grid_frontier_and_gsnr(tmp_path, tiny):
    """Both variants from one cache per method; the first trains the grid; GSNR logged; one shared scale."""
    from train.experiment import steering_sae
    from train.results_table import rows_from_payload

    chat, pre = write_small_data(tmp_path, n_chats=40)
    cfg = tiny_config(tmp_path, chat, pre, methods=("fast", "bt-f"), variants=("all", "no-first"), tokens=1280,
                      l1_coefficient=5.0, l1_grid=(1.0, 10.0), l0_grid=(0.1,), threshold_grid=(0.25,), gsnr_every=5)  # fmt: skip
    result = reproduce(cfg, *tiny, progress=False, command="fast-steer experiment reproduce --tiny")
    assert result.trained == ["fast/all", "fast/no-first", "bt-f/all", "bt-f/no-first"]
    for method in ("fast", "bt-f"):
        manifest = json.loads((cfg.out / "cache" / method / "harvest.json").read_text())
        assert manifest["tokens"] >= cfg.tokens and manifest["run"]["data"]["method"] == method
    rows = rows_from_payload(json.loads(result.paths["json"].read_text()))
    grid = {(r.method, r.variant, r.arch): sorted(x.coefficient for x in rows
            if (x.method, x.variant, x.arch) == (r.method, r.variant, r.arch)) for r in rows}  # fmt: skip
    assert grid[("fast", "all", "standard")] == [1.0, 5.0, 10.0]
    assert grid[("fast", "no-first", "standard")] == [5.0]
    assert grid[("bt-f", "all", "jumprelu")] == [0.01, 0.01, 0.1]
    thresholds = sorted(
        r.init_threshold for r in rows if (r.method, r.variant, r.arch) == ("fast", "all", "jumprelu")
    )
    assert thresholds == [0.25, 0.5, 0.5]
    fixed = {(5.0, None), (0.01, 0.5)}
    assert all(r.paper_view == ((r.coefficient, r.init_threshold) in fixed) for r in rows)
    # the no-first SAEs left position 0 out of training and of their scores
    for r in rows:
        meta = json.loads((Path(r.sae_dir) / "cfg.json").read_text())["metadata"]
        assert meta["exclude_first_token"] == (r.variant == "no-first")
        report = json.loads((Path(r.sae_dir) / EVAL_FILE).read_text())
        assert report["config"]["exclude_first_token"] == (r.variant == "no-first")
        if r.variant == "no-first":  # position 0 is not scored: MSE_st is already the after-position-0 one
            assert r.metrics["log2_mse_st"] == pytest.approx(r.metrics["log2_mse_st_after_first"])
        assert r.extra["gsnr"]["W_enc"] > 0 and r.extra["gsnr"]["measurements"] == 2
    scale = json.loads((cfg.out / "activation_scale.json").read_text())["norm_scaling_factor"]
    runs = [json.loads((Path(r.sae_dir) / "cfg.json").read_text())["metadata"]["run"] for r in rows]
    assert {run["training"]["norm_scaling_factor"] for run in runs} == {scale}
    md = result.paths["markdown"].read_text()
    assert "The L0-matched view" in md and "GSNR W_enc" in md
    assert result.paths["frontier"].stat().st_size > 5000
    # steering uses the no-first variant's fixed-coefficient SAE with the lowest held-out Δ LM loss
    fixed_no_first = [r for r in rows if (r.method, r.variant, r.paper_view) == ("fast", "no-first", True)]
    best = min(fixed_no_first, key=lambda r: r.metrics["delta_lm_loss"])
    assert len(fixed_no_first) == 2 and steering_sae(cfg.out, "fast") == Path(best.sae_dir)

    # docs/results.md is rendered from the copied results.json alone
    from apps.evaluation.results_doc import write_doc

    doc = write_doc(cfg.out, None, tmp_path / "docs" / "results.md")
    text = doc.read_text()
    copied = json.loads((tmp_path / "docs" / "results" / "results.json").read_text())
    assert copied["rows"] == json.loads(result.paths["json"].read_text())["rows"]
    assert (tmp_path / "docs" / "results" / "frontier.png").is_file()
    assert "fast-steer experiment reproduce --tiny" in text and "torch" in copied["environment"]
    assert "## Verdicts" in text and "FAST vs BT(F)" in text
    fast_jump = next(
        r for r in rows if (r.method, r.variant, r.arch, r.paper_view) == ("fast", "all", "jumprelu", True)
    )
    assert f"| all | FAST jumprelu | 0.01 | {fast_jump.metrics['mse']:.4g} |" in text
    assert "- main job recipe: FAST, no-first, fixed coefficients, Δ LM loss %: " in text
    # rebuilt from its own copies (the source is the copy): the same document
    assert write_doc(doc.parent / "results", None, doc).read_text() == text

    # what the steer-eval records of the SAE it steers: training, held-out metrics, the training command
    from apps.evaluation.steer_eval.provenance import sae_provenance
    from hub.sae_io import load_sae

    folder = steering_sae(cfg.out, "fast")
    record = sae_provenance(load_sae(folder), folder)
    assert record["trained_by"] == "fast-steer experiment reproduce --tiny"
    assert record["exclude_first_token"] is True and record["training_tokens"] == best.tokens
    assert record["architecture"] == best.arch and record["held_out"]["l0"] == best.metrics["l0"]
    assert record["held_out"]["delta_lm_loss_pct"] == best.metrics["delta_lm_loss_pct"]


def test_matched_points_interpolate_inside_the_common_l0_range():
    from train.results_table import interpolate, matched_points

    assert interpolate([(10, 4.0), (100, 1.0)], 10**1.5, log_y=True) == pytest.approx(2.0)
    assert interpolate([(10, 4.0), (100, 1.0)], 1000, log_y=True) is None

    def row(method, l0, mse):
        r = _row(method, mse, mse)
        r.metrics["l0"], r.paper_view = l0, False
        return r

    rows = [row("fast", 10, 4.0), row("fast", 100, 1.0), row("bt-f", 20, 8.0), row("bt-f", 200, 2.0)]
    matched = matched_points(rows)["standard"]
    assert matched["l0"][0] == pytest.approx(20) and matched["l0"][-1] == pytest.approx(100)
    fast, btf = matched["methods"]["fast"]["mse"], matched["methods"]["bt-f"]["mse"]
    assert fast[-1] == pytest.approx(1.0) and btf[0] == pytest.approx(8.0)
    assert all(b > f for f, b in zip(fast, btf, strict=True))
    lone = matched_points([row("fast", 10, 4.0), row("bt-f", 20, 8.0)])["standard"]
    assert lone["l0"] == [] and "two or more coefficients" in lone["why"]

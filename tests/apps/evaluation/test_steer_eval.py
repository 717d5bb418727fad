"""`fast-steer experiment steer-eval`: bootstrap and split logic with known answers, and the command end to
end on a tiny random model (real lm-eval with local IFEval / ARC-Easy files, real steering, no mocks)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.evaluation.stats import bootstrap_ratio, paired_difference, ratio
from apps.evaluation.steer_eval import choose_strength, folder_digest, reply_stats, run_key, split_items
from hub.sae_io import sae_metadata, save_sae
from tests.conftest import EVAL_DATA, SHARED_DATA, read_conversations, save_tiny_model
from tests.steer.helpers import random_sae
from train.experiment import HELDOUT_FILE

LAYER = 1


def test_ratio_pools_instruction_counts():
    assert ratio([(1, 2), (2, 2)]) == pytest.approx(0.75)
    assert ratio([(1, 1), (0, 1), (0, 1), (1, 1)]) == pytest.approx(0.5)


def test_paired_difference_known_answers():
    same = [(1, 1), (0, 1), (1, 1)]
    assert paired_difference(same, same) == paired_difference(same, same, seed=5)
    zero = paired_difference(same, same)
    assert (zero.estimate, zero.low, zero.high) == (0.0, 0.0, 0.0)
    full = paired_difference([(1, 1)] * 5, [(0, 1)] * 5)
    assert (full.estimate, full.low, full.high) == (1.0, 1.0, 1.0)
    # two items, one gained: resampled differences are 0, 1/2, 1 with probability 1/4, 1/2, 1/4
    two = paired_difference([(1, 1), (0, 1)], [(0, 1), (0, 1)], resamples=4000)
    assert (two.estimate, two.low, two.high) == (0.5, 0.0, 1.0)


def test_paired_difference_is_paired():
    base = [(float(i % 2), 1.0) for i in range(200)]
    flipped = base[:1] + [(0.0, 1.0)] + base[2:]  # the same items but one hit (item 1) lost
    interval = paired_difference(base, flipped)
    assert interval.estimate == pytest.approx(1 / 200)
    # only item 1 differs: a resample's difference is (draws of item 1) / 200, Poisson(1)-like
    assert interval.low == 0.0 and interval.high <= 4 / 200
    # an unpaired view of the same two accuracies (each near 0.5, n = 200) would be about +-0.1 wide
    assert bootstrap_ratio(base).high - bootstrap_ratio(base).low > 0.1


def test_bootstrap_ratio_width_matches_the_normal_approximation():
    items = [(float(i % 2), 1.0) for i in range(400)]
    interval = bootstrap_ratio(items, resamples=4000, seed=1)
    assert interval.estimate == 0.5
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * 0.025, rel=0.12)


def test_bootstrap_rejects_bad_items():
    with pytest.raises(ValueError, match="line up"):
        paired_difference([(1, 1)], [(1, 1), (0, 1)])
    with pytest.raises(ValueError, match="0 <= hits <= total"):
        ratio([(2, 1)])
    with pytest.raises(ValueError, match="at least one item"):
        bootstrap_ratio([])


def test_split_items_disjoint_seeded_and_checked():
    dev, test = split_items(541, 40, 80, seed=0)
    assert len(dev) == 40 and len(test) == 80 and not set(dev) & set(test)
    assert all(0 <= i < 541 for i in dev + test) and dev == sorted(dev)
    assert split_items(541, 40, 80, seed=0) == (dev, test)
    assert split_items(541, 40, 80, seed=1) != (dev, test)
    more_dev, same_test = split_items(541, 100, 80, seed=0)
    assert same_test == test and set(dev) < set(more_dev)  # a larger dev split keeps the test set
    with pytest.raises(ValueError, match="exceed the 10 IFEval prompts"):
        split_items(10, 6, 5, seed=0)


def test_choose_strength_best_then_smaller():
    assert choose_strength({15.0: 0.2, 25.0: 0.4, 50.0: 0.4, 100.0: 0.1}) == 25.0
    assert choose_strength({200.0: 0.3}) == 200.0


def test_reply_stats_known_answers(chatml_tokenizer):
    stats = reply_stats(["a b c a b c"], chatml_tokenizer, max_new_tokens=1000)
    assert stats["distinct_1"] == pytest.approx(3 / 6)
    assert stats["distinct_2"] == pytest.approx(3 / 5)  # ab bc ca ab bc
    assert stats["repetition"] == pytest.approx(1 / 4)  # abc bca cab abc
    assert stats["mean_words"] == 6 and stats["ended"] == 1.0
    assert reply_stats(["a b c a b c"], chatml_tokenizer, max_new_tokens=1)["ended"] == 0.0


def test_folder_digest_follows_the_weights(tmp_path):
    first = folder_digest(save_sae(random_sae(16, d_sae=8, seed=0), tmp_path / "a"))
    assert folder_digest(save_sae(random_sae(16, d_sae=8, seed=0), tmp_path / "b")) == first
    assert folder_digest(save_sae(random_sae(16, d_sae=8, seed=1), tmp_path / "a")) != first


def test_run_key_tells_apart_dtype_device_batch_and_versions(tmp_path):
    """A GPU bfloat16 rerun never reuses CPU float32 cells; a moved eval folder with the same files does."""
    import torch
    import transformers

    eval_data = tmp_path / "eval"
    eval_data.mkdir()
    (eval_data / "arc_easy_test.jsonl").write_text('{"id": 1}\n')
    base = run_key("default", 15, eval_data, "float32", "cpu", 8)
    assert base["versions"] == {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fast-steer": base["versions"]["fast-steer"],
    }
    for changed in (
        run_key("default", 15, eval_data, "bfloat16", "cpu", 8),
        run_key("default", 15, eval_data, "float32", "cuda (NVIDIA H100 80GB HBM3)", 8),
        run_key("default", 15, eval_data, "float32", "cpu", 32),
    ):
        assert changed != base and {k for k in base if base[k] != changed[k]} < {
            "dtype",
            "device",
            "batch_size",
        }
    shutil.copytree(eval_data, tmp_path / "moved")
    assert run_key("default", 15, tmp_path / "moved", "float32", "cpu", 8) == base
    (eval_data / "arc_easy_test.jsonl").write_text('{"id": 2}\n')
    assert (
        run_key("default", 15, eval_data, "float32", "cpu", 8)["eval_data_sha256"] != base["eval_data_sha256"]
    )


@pytest.fixture
def tiny_setup(tmp_path, chatml_tokenizer):
    """A saved tiny Llama, two random SAE folders on its layer 1, chat data and a small eval folder."""
    model = save_tiny_model(tmp_path / "model", chatml_tokenizer)
    saes = {}
    for name, seed in (("fast", 0), ("btf", 1)):
        sae = random_sae(model.config.hidden_size, d_sae=32, seed=seed)
        sae.cfg.metadata = sae_metadata("tiny", LAYER)
        saes[name] = save_sae(sae, tmp_path / name)
    eval_data = tmp_path / "data" / "eval"
    eval_data.mkdir(parents=True)
    (tmp_path / "data" / "nltk_data").symlink_to(SHARED_DATA / "nltk_data")
    for name, n in (
        ("ifeval_input_data", 6),
        ("arc_easy_train", 2),
        ("arc_easy_validation", 2),
        ("arc_easy_test", 4),
    ):
        with open(EVAL_DATA / f"{name}.jsonl", encoding="utf-8") as fh:
            (eval_data / f"{name}.jsonl").write_text("".join(next(fh) for _ in range(n)), encoding="utf-8")
    (tmp_path / "exp").mkdir()
    heldout = "".join(json.dumps(c) + "\n" for c in read_conversations(n=4))
    (tmp_path / "exp" / HELDOUT_FILE).write_text(heldout, encoding="utf-8")  # as `reproduce` freezes it
    return tmp_path, saes, eval_data


def test_steer_eval_end_to_end_and_reuse(tiny_setup):
    root, saes, eval_data = tiny_setup
    out = root / "exp"
    args = ["experiment", "steer-eval", "--out", str(out), "--model", str(root / "model"),
            "--fast-sae", str(saes["fast"]), "--btf-sae", str(saes["btf"]), "--strengths", "50,400",
            "--dev", "3", "--test", "3", "--arc", "4", "--max-new-tokens", "6", "--conversations", "4",
            "--eval-data", str(eval_data), "--resamples", "200", "--dtype", "float32",
            "--quiet"]  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    folder = out / "steer_eval"
    report = json.loads((folder / "steer_eval.json").read_text())
    split = report["split"]
    assert len(split["dev_doc_ids"]) == 3 and len(split["test_doc_ids"]) == 3
    assert not set(split["dev_doc_ids"]) & set(split["test_doc_ids"])
    conds = report["conditions"]
    assert set(conds) == {"plain", "prompt", "fast", "random", "btf"}
    assert report["settings"]["anchor_token"] == "<|im_start|>", "ChatML's turn-opening token"
    assert conds["prompt"]["system_prompt"] and conds["plain"]["system_prompt"] is None
    for name in ("fast", "random", "btf"):
        c = conds[name]
        dev_scores = {r["strength"]: r["metrics"]["prompt_level_strict_acc"]["estimate"] for r in c["dev"]}
        assert list(dev_scores) == [50.0, 400.0]
        assert c["chosen_strength"] == choose_strength(dev_scores)
        assert c["test"][0]["strength"] == c["chosen_strength"] == c["arc"]["strength"]
        assert [r["strength"] for r in c["test"]] == sorted({c["chosen_strength"], 400.0})
        assert c["dev"][1]["alpha"] == pytest.approx(4.0 * report["settings"]["residual_norm_median"])
        assert isinstance(c["sweet_spot"]["appears"], bool) and c["sweet_spot"]["statement"]
    assert conds["random"]["feature"] == 0 and conds["fast"]["feature"] is not None
    for c in conds.values():
        for row in c["dev"] + c["test"]:
            assert row["items"] == 3
            assert set(row["metrics"]) == {
                "prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc"
            }  # fmt: skip
            for m in row["metrics"].values():
                assert 0.0 <= m["low"] <= m["estimate"] <= m["high"] <= 1.0
        assert c["arc"]["items"] == 4 and 0.0 <= c["arc"]["metrics"]["acc"]["estimate"] <= 1.0
        stats = c["test"][0]["reply_stats"]
        assert stats["mean_tokens"] > 0 and 0.0 <= stats["ended"] <= 1.0
        assert len(c["test"][0]["examples"]) == 3
    plain_diff = conds["plain"]["test"][0]["diff_vs_plain"]["prompt_level_strict_acc"]
    assert (plain_diff["estimate"], plain_diff["low"], plain_diff["high"]) == (0.0, 0.0, 0.0)
    # a strong push (4x the special-position norm) changes the greedy replies of a random model
    plain_reply = conds["plain"]["test"][0]["examples"][0]["reply"]
    assert any(
        r["examples"][0]["reply"] != plain_reply for r in conds["fast"]["test"] + conds["random"]["test"]
    )
    random_cfg = json.loads((folder / "random_direction" / "cfg.json").read_text())
    assert random_cfg["d_sae"] == 1 and random_cfg["metadata"]["seed"] == 0
    assert (folder / "steer_eval.png").stat().st_size > 5000
    assert "| FAST top feature |" in first.stdout and "Sweet spot" in first.stdout
    steered = report["settings"]["saes"]
    assert steered["fast"]["folder"] == str(saes["fast"]) and steered["btf"]["d_sae"] == 32
    assert steered["fast"]["trained_by"] is None and "held_out" not in steered["fast"]  # not from reproduce
    assert "Steered SAEs" in first.stdout
    computed = report["cells"]["computed"]
    assert report["cells"]["reused"] == [] and len(computed) == len(set(computed))

    stored = json.loads((folder / "cells" / f"{computed[0]}.json").read_text())["key"]
    assert (stored["dtype"], stored["device"], stored["batch_size"]) == ("float32", "cpu", 8)
    assert set(stored["versions"]) == {"torch", "transformers", "fast-steer"}

    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    again = json.loads((folder / "steer_eval.json").read_text())
    assert again["cells"]["computed"] == [] and sorted(again["cells"]["reused"]) == sorted(computed)
    assert again["conditions"] == conds


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strengths", "0,50"], "distinct positive numbers"),
        (["--strengths", "x"], "expected comma-separated numbers"),
        (["--dev", "0"], "dev must be a positive integer"),
        (["--dev", "4", "--test", "3", "--arc", "4"], "exceed the 6 IFEval prompts"),
        (["--arc", "5"], "--arc 5 exceeds the 4 ARC-Easy test items"),
    ],
)
def test_steer_eval_bad_input(tiny_setup, extra, message):
    root, saes, eval_data = tiny_setup
    args = ["experiment", "steer-eval", "--out", str(root / "exp"), "--model", str(root / "model"),
            "--dtype", "float32", "--quiet", "--fast-sae", str(saes["fast"]),
            "--btf-sae", str(saes["btf"]), "--eval-data", str(eval_data), *extra]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and message in result.output


def test_steer_eval_missing_sae_folders(tmp_path):
    result = CliRunner().invoke(main, ["experiment", "steer-eval", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "no trained FAST SAE" in result.output and "--fast-sae" in result.output
    result = CliRunner().invoke(
        main, ["experiment", "steer-eval", "--fast-sae", str(tmp_path), "--btf-sae", str(tmp_path)]
    )
    assert result.exit_code != 0 and "has no cfg.json" in result.output

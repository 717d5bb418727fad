"""`fast-steer interp export-neuronpedia`: a real run exported, validated against the schema, read back and
compared with its interp.json; bad records are refused naming the record and the field."""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.interp.neuronpedia import NeuronpediaSchemaError, read_export, validate
from apps.interp.neuronpedia.schema import MAX_TOKENS, SCHEMAS
from tests.apps.interp.run_factory import JUDGE, finished_run
from train.interp.collection import Collection


@pytest.fixture(scope="module")
def exported(chatml_tokenizer, tmp_path_factory):
    """(run folder, interp.json, export folder, records read back)."""
    root = tmp_path_factory.mktemp("neuronpedia")
    sae, run = finished_run(root, chatml_tokenizer)
    args = ["interp", "export-neuronpedia", str(sae), "--from", str(run), "--out", str(root / "np")]
    result = CliRunner().invoke(main, [*args, "--model-id", "tiny-llama"])
    assert result.exit_code == 0, result.output
    folder = root / "np" / "tiny-llama" / "1-fast-steer-jumprelu-48"
    assert f"wrote {folder}" in result.output
    return run, json.loads((run / "interp.json").read_text()), folder, read_export(folder)


def test_export_reads_back_as_the_run(exported):
    run, interp, folder, records = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "activations", "explanations", "features", "model.jsonl", "release.jsonl", "source.jsonl", "sourceset.jsonl",
    ]  # fmt: skip
    assert (
        records["source"][0]["id"] == "1-fast-steer-jumprelu-48" and records["model"][0]["id"] == "tiny-llama"
    )
    collection = Collection.open(run / "collections" / interp["settings"]["collection"]["folder"])
    features = {int(r["index"]): r for r in records["features"]}
    assert sorted(features) == collection.live_features().tolist()
    assert all(
        r["layer"] == "1-fast-steer-jumprelu-48"
        for kind in ("features", "activations")
        for r in records[kind]
    )
    for entry in interp["features"]:
        f = entry["feature"]
        row = features[f]
        assert row["frac_nonzero"] == pytest.approx(entry["density"])
        assert row["maxActApprox"] == pytest.approx(entry["max_activation"])
        assert row["pos_str"] == [t for t, _ in entry["proxies"]["promoted"]]
        assert row["neg_values"] == pytest.approx([v for _, v in entry["proxies"]["suppressed"]])
        explained = {e["typeName"]: e for e in records["explanations"] if e["index"] == str(f)}
        name, explainer = explained["fast-steer-fast-paper"], explained["fast-steer-explainer"]
        assert name["description"] == entry["name"] and explainer["description"] == entry["explanation"]
        assert name["explanationModelName"] == JUDGE
        assert [(s["explanationScoreTypeName"], s["value"]) for s in name["scores"]] == [
            ("fast-paper", entry["fast_paper"]["score"])
        ]
        assert {s["explanationScoreTypeName"]: s["value"] for s in explainer["scores"]} == {
            s: entry[s]["balanced_accuracy"] for s in ("detection", "fuzzing")
        }
        activations = [a for a in records["activations"] if a["index"] == str(f)]
        top = collection.feature(f).top
        assert [a["tokens"] for a in activations[: len(top)]] == [list(w.tokens) for w in top]
        assert activations[0]["maxValue"] == pytest.approx(entry["max_activation"], rel=1e-3)
    unscored = set(features) - {e["feature"] for e in interp["features"]}
    assert unscored and not any(int(e["index"]) in unscored for e in records["explanations"])


def test_bad_records_name_the_record_and_the_field(exported):
    _, _, _, records = exported
    good = records["activations"][0]
    validate("activations", good, "ok")
    cases = [
        (
            {"tokens": ["a"] * (MAX_TOKENS + 1), "values": [0.0] * (MAX_TOKENS + 1)},
            "'tokens' has 1025 items, at most 1024",
        ),
        ({"values": good["values"][:-1]}, "'values' has"),
        ({"index": int(good["index"])}, "'index' must be a feature index"),
        ({"binContains": 1.5}, "'binContains' is 1.5, outside [0, 1]"),
        ({"maxValueTokenIndex": len(good["tokens"])}, "'maxValueTokenIndex' is"),
        ({"values": [float("nan")] * len(good["tokens"])}, "'values' item 0 must be a finite number"),
    ]
    for change, message in cases:
        with pytest.raises(NeuronpediaSchemaError, match="batch-0 line 7") as err:
            validate("activations", {**good, **change}, "activations/batch-0 line 7")
        assert message in str(err.value)
    missing = copy.deepcopy(records["explanations"][0])
    del missing["typeName"]
    with pytest.raises(NeuronpediaSchemaError, match=r"lacks \['typeName'\]"):
        validate("explanations", missing, "x")
    with pytest.raises(NeuronpediaSchemaError, match="'description' has 513 characters, at most 512"):
        validate("explanations", {**records["explanations"][0], "description": "x" * 513}, "x")
    assert set(SCHEMAS) == {
        "model",
        "release",
        "sourceset",
        "source",
        "features",
        "activations",
        "explanations",
    }


def test_a_damaged_export_is_refused_on_read(exported, tmp_path):
    import gzip
    import shutil

    _, _, folder, _ = exported
    copy_ = tmp_path / "copy"
    shutil.copytree(folder, copy_)
    path = copy_ / "features" / "batch-0.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.readlines()
    row = json.loads(lines[1])
    row["frac_nonzero"] = 2.0
    lines[1] = json.dumps(row) + "\n"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(lines)
    with pytest.raises(NeuronpediaSchemaError, match=r"batch-0.jsonl.gz line 2: field 'frac_nonzero' is 2.0"):
        read_export(copy_)

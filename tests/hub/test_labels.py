"""Feature labels in an SAE folder: storing runs' labellings side by side, the default, loading through
`load_sae`, malformed files, the lexical search, and labels travelling through push and the model card."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from hub import load_sae, save_sae
from hub.labels import (
    LABELS_FILE,
    FeatureLabel,
    Labelling,
    LabelsFormatError,
    LabelsWarning,
    labellings_from_run,
    read_labels,
    store_labellings,
)
from hub.publish import push_saes
from steer.errors import FastSteerError, MissingFileError
from tests.hub.label_factory import LABELS, label_sae, write_run
from tests.hub.sae_factory import random_sae


@pytest.fixture
def folder(tmp_path):
    return save_sae(random_sae("standard", d_sae=64, method="FAST"), tmp_path / "sae")


def test_labels_round_trip_through_load_sae(folder, tmp_path):
    label_sae(folder, tmp_path / "run")
    labels = load_sae(folder).labels
    assert labels.judge_model == "judge-a" and labels.scorer == "fast-paper", "the rubric scores best here"
    assert labels.get(3) == "polite tone" and labels.get(5) == "capital city"
    assert labels.get(4) is None, "an unlabelled feature has no label"
    assert labels.features[5].explanation == LABELS[5][2], "the rubric name comes with the run's explanation"
    assert labels.features[5].score == 4 and labels.features[5].density == pytest.approx(0.004)
    assert labels.features[9].density is None
    detection = next(lab for lab in read_labels(folder).labellings if lab.scorer == "detection")
    assert detection.get(3) == "polite tone", "a detection labelling shows the rubric's name of the feature"
    assert detection.features[3].explanation == LABELS[3][2] and detection.features[3].score == 0.95


def test_a_folder_without_labels_loads_as_before(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sae = load_sae(folder)
    assert sae.labels is None and read_labels(folder) is None


def test_judges_coexist_and_a_rerun_replaces_only_its_own_labelling(folder, tmp_path):
    label_sae(folder, tmp_path / "a", judge="judge-a")
    other = {3: ("courtesy", 3, "courteous words", 0.8, 0.012)}
    write_run(tmp_path / "b", folder, judge="judge-b", labels=other)
    labels, notes = store_labellings(folder, labellings_from_run(tmp_path / "b"))
    assert notes == [] and len(labels.labellings) == 4, "a second judge adds labellings, removes none"
    assert {(lab.judge_model, lab.scorer) for lab in labels.labellings} == {
        ("judge-a", "fast-paper"), ("judge-a", "detection"), ("judge-b", "fast-paper"), ("judge-b", "detection")
    }  # fmt: skip
    rerun = {5: ("capitals", 5, "capital cities", 1.0, 0.004)}
    write_run(tmp_path / "a2", folder, judge="judge-a", labels=rerun, date="2026-12-07T10:00:00+00:00")
    labels, notes = store_labellings(folder, labellings_from_run(tmp_path / "a2"))
    assert len(notes) == 2 and all("replaced the labelling of judge 'judge-a'" in n for n in notes)
    assert "4 features" in notes[0] and "1 features" in notes[0], notes[0]
    stored = read_labels(folder)
    assert stored.notes == notes, "the notes are kept in the file"
    by_key = {(lab.judge_model, lab.scorer): lab for lab in stored.labellings}
    assert (
        by_key["judge-a", "fast-paper"].get(3) is None
        and by_key["judge-a", "fast-paper"].get(5) == "capitals"
    )
    assert by_key["judge-b", "fast-paper"].get(3) == "courtesy", "the other judge's labels are untouched"


def test_the_default_is_the_most_trusted_then_best_scored_labelling(folder, tmp_path):
    weak = {3: ("polite-ish", 2, "politeness", 0.6, 0.012)}
    label_sae(folder, tmp_path / "a", judge="weak", labels=weak)
    assert load_sae(folder).labels.judge_model == "weak"
    label_sae(folder, tmp_path / "b", judge="strong")
    assert load_sae(folder).labels.judge_model == "strong", "higher mean score wins"
    label_sae(folder, tmp_path / "c", judge="validated", labels=weak, validated=True)
    labels = load_sae(folder).labels
    assert labels.judge_model == "validated", "a judge that passed its controls outranks a better score"
    assert labels.judge_validated is True and labels.get(3) == "polite-ish"


def _labelled_file(folder):
    return json.loads((folder / LABELS_FILE).read_text())


@pytest.mark.parametrize(
    ("corrupt", "field"),
    [
        (lambda d: d["labellings"][0]["features"][1].update(label=5), "labellings[0].features[1].label"),
        (lambda d: d["labellings"][0]["features"][0].update(feature=64), "labellings[0].features[0].feature"),
        (lambda d: d["labellings"][1].update(score_range=[5, 1]), "labellings[1].score_range"),
        (lambda d: d["labellings"][0]["features"][2].update(score="high"), "labellings[0].features[2].score"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.pop("labellings"), "labellings"),
    ],
)
def test_a_malformed_file_warns_naming_file_and_field_and_the_sae_still_loads(
    folder, tmp_path, corrupt, field
):
    label_sae(folder, tmp_path / "run")
    data = _labelled_file(folder)
    corrupt(data)
    (folder / LABELS_FILE).write_text(json.dumps(data))
    path = str(folder / LABELS_FILE)
    with pytest.warns(LabelsWarning) as caught:
        sae = load_sae(folder)
    message = str(caught[0].message)
    assert path in message and f"field '{field}'" in message and "without labels" in message, message
    assert sae.labels is None and sae.d_sae == 64
    with pytest.raises(LabelsFormatError) as strict:
        read_labels(folder, d_sae=64)
    assert (
        isinstance(strict.value, FastSteerError) and path in str(strict.value) and field in str(strict.value)
    )


def test_unreadable_json_and_a_run_file_in_the_sae_folder_warn(folder, tmp_path):
    (folder / LABELS_FILE).write_text("{not json")
    with pytest.warns(LabelsWarning, match="is not valid JSON"):
        assert load_sae(folder).labels is None
    write_run(tmp_path / "run", folder)
    (folder / LABELS_FILE).write_text((tmp_path / "run" / LABELS_FILE).read_text())
    with pytest.warns(LabelsWarning, match="fast-steer interp label SAE --from RUN_DIR"):
        assert load_sae(folder).labels is None


def test_storing_over_a_malformed_file_is_refused_and_leaves_it(folder, tmp_path):
    (folder / LABELS_FILE).write_text('{"format": "other"}')
    write_run(tmp_path / "run", folder)
    with pytest.raises(LabelsFormatError, match="field 'format'"):
        store_labellings(folder, labellings_from_run(tmp_path / "run"))
    assert (folder / LABELS_FILE).read_text() == '{"format": "other"}'


def test_run_folders_are_checked(folder, tmp_path):
    with pytest.raises(
        MissingFileError, match="no explanations.json in .*--out folder of `fast-steer interp run`"
    ):
        labellings_from_run(tmp_path / "nothing")
    run = write_run(tmp_path / "run", folder, labels={3: (None, 4, "polite phrasing", 0.9, 0.01)})
    labellings = labellings_from_run(run)
    assert [lab.scorer for lab in labellings] == ["detection"], "an unparsed rubric answer gives no label"
    assert labellings[0].get(3) == "polite phrasing", "without a rubric name the explanation is the label"
    other = save_sae(random_sae("standard", d_sae=64, seed=7), tmp_path / "other")
    from train.interp.identity import sae_identity

    with pytest.raises(LabelsFormatError, match="scored another SAE"):
        labellings_from_run(run, sae_identity(other)["weights_sha256"])
    assert labellings_from_run(run, sae_identity(folder)["weights_sha256"])
    small = save_sae(random_sae("standard", d_sae=4), tmp_path / "small")
    with pytest.raises(LabelsFormatError, match=r"feature\(s\) \[5, 7, 9\] but the SAE .* has 4 features"):
        store_labellings(small, labellings_from_run(write_run(tmp_path / "run2", folder)))


def _labelling(texts: dict[int, tuple[str, str | None]]) -> Labelling:
    features = {
        i: FeatureLabel(i, label, explanation, float(i), None) for i, (label, explanation) in texts.items()
    }
    return Labelling("j", "fast-paper", "2026-12-06", "run", (1.0, 5.0), features)


def test_search_ranks_by_bm25_over_label_and_explanation():
    labelling = _labelling(
        {
            1: ("polite tone", "greetings and thanks"),
            2: ("capital city", "names of capital cities"),
            3: ("tone of voice", None),
            4: ("city names", "towns"),
        }
    )
    hits = labelling.search("Polite TONE!", limit=10)
    assert [h.feature for h in hits] == [1, 3], "both words beat one; case and punctuation ignored"
    # the documented formula by hand: feature 3 holds "tone" once in 3 words; N = 4 texts of 5, 6, 3 and 3
    # words (avg 4.25), 2 of them hold "tone"
    idf = math.log(1 + (4 - 2 + 0.5) / (2 + 0.5))
    expected = idf * 1 * 2.2 / (1 + 1.2 * (1 - 0.75 + 0.75 * 3 / 4.25))
    assert hits[1].match == pytest.approx(expected)
    assert hits[0].score == 1.0 and hits[0].density is None, "results carry the judge score and density"
    assert [h.feature for h in labelling.search("capital")] == [2], "found in label and explanation"
    assert [h.feature for h in labelling.search("city")] == [4, 2], "the shorter text holding the word first"
    assert labelling.search("city", limit=1)[0].feature == 4
    assert labelling.search("") == [] and labelling.search("  ?! ") == [] and labelling.search("zebra") == []
    assert hits[0].to_dict() == {"feature": 1, "label": "polite tone", "score": 1.0, "density": None,
                                 "match": round(hits[0].match, 4)}  # fmt: skip


def test_push_uploads_the_labels_and_the_card_shows_them(folder, tmp_path):
    label_sae(folder, tmp_path / "run")
    result = push_saes([folder], "me/labelled", dry_run_dir=tmp_path / "tree")
    sub = tmp_path / "tree" / result.sae_ids[0]
    assert _labelled_file(sub) == _labelled_file(folder), "explanations.json is uploaded as is"
    assert load_sae(sub).labels.get(3) == "polite tone"
    card = (tmp_path / "tree" / "README.md").read_text()
    assert "Feature labels (`explanations.json`" in card
    assert "| judge-a | fast-paper | 2026-12-06T10:00:00+00:00 | 4 | 0.625 | not checked |" in card
    assert "| 3 | polite tone | 5 | 0.012 |" in card and "| 5 | capital city | 4 | 0.004 |" in card
    assert card.index("| 3 | polite tone |") < card.index("| 5 | capital city |"), "best-scored first"
    assert "Evaluation results (`explanations.json`)" not in card, "labels are not shown as results"
    assert f'--sae-id "{result.sae_ids[0]}" --search "TEXT"' in card


def test_push_refuses_malformed_labels(folder, tmp_path):
    (folder / LABELS_FILE).write_text('{"format": "fast-steer-labels", "version": 1, "labellings": 3}')
    with pytest.raises(LabelsFormatError, match="field 'labellings' must be a list"):
        push_saes([folder], "me/labelled", dry_run_dir=tmp_path / "tree")

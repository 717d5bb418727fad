"""The fast-paper, detection and fuzzing protocols and the controls, end to end through real HTTP judges:
constant, random, garbage and an oracle that knows the ground truth."""

from __future__ import annotations

import asyncio

import pytest

from apps.interp import controls, detection, fast_paper
from apps.interp.fake_judge import FakeAnswer, constant, random_digits, serve_fake_judge
from apps.interp.judge import Judge, JudgeConfig
from apps.interp.prompts import activation_lines, crop, marked_text, parse_rubric, plain_text
from tests.apps.interp.helpers import feature, hard_negatives, negatives, window

FEATURES = [feature(i) for i in range(6)]


def judge(url: str, tmp_path, model: str = "judge") -> Judge:
    return Judge(JudgeConfig(url=url, model=model, cache_dir=tmp_path / "cache", backoff_s=0.0))


def splits(seed: int = 0) -> list[detection.Split]:
    return [detection.split(f, negatives(f.feature), hard_negatives(f.feature), seed) for f in FEATURES]


def test_windows_render_as_token_tab_activation_lines():
    w = window(1, ["<|im_start|>", "user", "\n", "a\tb", " x"], [0.0, 1.0, 0.0, 9.99, 5.0])
    assert activation_lines(w, top=10.0).splitlines() == [
        "<|im_start|>\t0",
        "user\t1",
        "\\n\t0",
        "a\\tb\t9",
        " x\t5",
    ]
    cropped = crop(w, 1)
    assert cropped.tokens == ("\n", "a\tb", " x") and cropped.tokens[cropped.peak] == "a\tb"
    assert marked_text(w, {1, 3, 4}) == "<|im_start|><<user>>\n<<a\tb x>>"


def test_rubric_answers_are_parsed_or_missing():
    assert parse_rubric("Score: [[4]] Name: [[Fruit names]]") == (4, "Fruit names")
    assert parse_rubric("The final verdict score is: 5.5") == (None, None)
    assert parse_rubric("[[7]] [[x]]") == (None, None)
    assert parse_rubric("I think [[2]] at first... Score: [[5]] Name: [[Dates]]", reason_first=True) == (
        5,
        "Dates",
    )


def test_feature_sample_is_seeded_and_refuses_too_many():
    dead = feature(9)
    dead.top[4] = window(5, ["a"], [0.0])  # one of its five top windows is silent: not eligible
    pool = {f.feature: f for f in [*FEATURES, dead]}
    picked = fast_paper.sample_features(sorted(pool), pool.__getitem__, 3, seed=1)
    assert picked == fast_paper.sample_features(sorted(pool), pool.__getitem__, 3, seed=1)
    assert [f.feature for f in picked] == sorted(f.feature for f in picked)
    with pytest.raises(ValueError, match="more than the 6 live features with 5 top windows"):
        fast_paper.sample_features(sorted(pool), pool.__getitem__, 7, seed=1)
    with pytest.raises(ValueError, match="more than the 7 live features"):
        fast_paper.sample_features(sorted(pool), pool.__getitem__, 8, seed=1)


def test_constant_four_judge_gives_share_4_5_of_one(tmp_path):
    items = [fast_paper.rubric_item(f) for f in FEATURES]
    with serve_fake_judge(constant("Score: [[4]] Name: [[Fruit]]")) as server:
        scores = asyncio.run(fast_paper.score_items(judge(server.url, tmp_path), items))
        body = server.bodies[0]
    summary = fast_paper.summarise(scores)
    assert summary["share_4_5"]["value"] == 1.0 and summary["cdf_3"]["value"] == 0.0
    assert summary["histogram"] == {"1": 0, "2": 0, "3": 0, "4": 6, "5": 0}
    assert summary["n_scored"] == 6 and summary["n_parse_failures"] == 0
    assert all(s.name == "Fruit" for s in scores)
    assert body["temperature"] == 0 and body["max_tokens"] == fast_paper.SCORE_TOKENS
    assert body["messages"][1]["content"].count("Example ") == fast_paper.TOP_K


def test_garbage_answers_are_missing_not_low(tmp_path):
    items = [fast_paper.rubric_item(f) for f in FEATURES]
    with serve_fake_judge(constant("The final verdict score is: 5.5")) as server:
        scores = asyncio.run(fast_paper.score_items(judge(server.url, tmp_path), items))
    summary = fast_paper.summarise(scores)
    assert (
        summary["n_scored"] == 0 and summary["n_parse_failures"] == 6 and summary["parse_failure_rate"] == 1
    )
    assert summary["share_4_5"]["value"] is None and summary["histogram"]["1"] == 0
    assert all(s.score is None and s.cache_id for s in scores)


def test_expected_score_from_logprobs(tmp_path):
    answer = FakeAnswer("Score: [[4]] Name: [[Fruit]]", digit_probs={"4": 0.5, "5": 0.25, "2": 0.25})
    with serve_fake_judge(lambda body: answer) as server:
        scores = asyncio.run(
            fast_paper.score_items(judge(server.url, tmp_path), [fast_paper.rubric_item(FEATURES[0])])
        )
    assert scores[0].score == 4 and scores[0].expected_score == pytest.approx(0.5 * 4 + 0.25 * 5 + 0.25 * 2)


def test_detection_split_is_disjoint_and_balanced():
    for s, f in zip(splits(), FEATURES, strict=True):
        train = {w.conversation for w in s.train}
        assert len(s.train) == detection.TRAIN_TOP + 10
        assert not train & {t.window.conversation for t in s.test}
        assert sum(t.label for t in s.test) == 20 and sum(1 - t.label for t in s.test) == 20
        assert {t.kind for t in s.test if t.label == 0} == {"random", "hard"}
        assert sorted(t.decile for t in s.test if t.label) == sorted(list(range(10)) * 2)
        assert all(t.window.max_activation == 0 for t in s.test if t.label == 0)
        assert all(max(w.activations) > 0 for w in s.train) and f.feature == s.feature


def oracle(truth: dict[str, int], with_logprobs: bool):
    """Answers the ground truth of the text it is shown (P(1) = 0.9 / 0.1 where log-probs are asked)."""

    def respond(body):
        text = body["messages"][1]["content"].split("Text:\n", 1)[1]
        label = truth[text]
        probs = {"1": 0.9, "0": 0.1} if label else {"1": 0.1, "0": 0.9}
        return FakeAnswer(f"[[{label}]]", digit_probs=probs if with_logprobs else None)

    return respond


@pytest.mark.parametrize("scorer", detection.SCORERS)
def test_oracle_scores_one_and_constant_exactly_half(tmp_path, scorer):
    cases = splits()
    explanations = {s.feature: f"the word {i}" for i, s in enumerate(cases)}
    truth = {}
    for s in cases:
        marks = detection.fuzz_marks(s.test, 0 + s.feature)
        for item, m in zip(s.test, marks, strict=True):
            truth[marked_text(item.window, m) if scorer == "fuzzing" else plain_text(item.window)] = (
                item.label
            )
    with serve_fake_judge(oracle(truth, with_logprobs=True)) as server:
        right = asyncio.run(
            detection.classify(judge(server.url, tmp_path, "oracle"), scorer, cases, explanations, 0)
        )
    with serve_fake_judge(constant("[[1]]")) as server:
        const = asyncio.run(
            detection.classify(judge(server.url, tmp_path, "const"), scorer, cases, explanations, 0)
        )
    assert [r.balanced_accuracy for r in right] == [1.0] * len(cases)
    assert [r.auroc for r in right] == [1.0] * len(cases)
    assert [r.balanced_accuracy for r in const] == [0.5] * len(cases)
    summary = detection.summarise(right)
    assert summary["balanced_accuracy_median"] == 1.0 and summary["share_ge_0_8"] == 1.0
    assert summary["auroc_median"] == 1.0 and summary["n_items"] == 40 * len(cases)


def test_explanations_and_missing_answers(tmp_path):
    cases = splits()[:2]
    with serve_fake_judge(constant("[[the word apple]]")) as server:
        explained = asyncio.run(detection.explain(judge(server.url, tmp_path), cases))
        shown = [body["messages"][1]["content"] for body in server.bodies]  # in arrival order: concurrent
    assert {e.text for e in explained.values()} == {"the word apple"}
    assert len(shown) == 2 and all(text.count("Example ") == 20 for text in shown)
    assert sum("<< apple>>" in text for text in shown) == 1
    with serve_fake_judge(constant("yes, probably")) as server:
        results = asyncio.run(
            detection.classify(judge(server.url, tmp_path, "g"), "detection", cases, {0: "x", 1: None}, 0)
        )
    assert len(results) == 1  # a feature without an explanation is not scored
    summary = detection.summarise(results)
    assert summary["n_parse_failures"] == 40 and summary["balanced_accuracy_median"] is None
    assert summary["auroc_median"] is None


def test_shuffled_explanations_are_a_derangement():
    explanations = {f: f"e{f}" for f in range(7)} | {7: None}
    moved = controls.shuffled(explanations, seed=3)
    assert sorted(moved) == list(range(7)) and sorted(moved.values()) == sorted(f"e{f}" for f in range(7))
    assert all(moved[f] != f"e{f}" for f in moved)


def test_chimeras_mix_five_features_and_permutation_keeps_the_values():
    items = controls.chimeras(FEATURES, 4, seed=0)
    for item in items:
        words = {w.tokens[5] for w in item.windows}
        assert len(item.windows) == 5 and len(words) == 5
    real = fast_paper.rubric_item(FEATURES[0])
    (shuffled,) = controls.permuted([real], seed=0)
    for a, b in zip(real.windows, shuffled.windows, strict=True):
        assert sorted(a.activations) == sorted(b.activations) and a.tokens == b.tokens
    assert any(a.activations != b.activations for a, b in zip(real.windows, shuffled.windows, strict=True))


def test_controls_flag_a_constant_judge(tmp_path):
    """A judge that always answers [[4]] / [[1]] passes the arithmetic checks and fails validation."""
    items = [fast_paper.rubric_item(f) for f in FEATURES]
    cases = splits()
    explanations = {s.feature: "the word" for s in cases}
    with serve_fake_judge(constant("[[4]] [[x]]")) as server:
        j = judge(server.url, tmp_path)
        real = asyncio.run(fast_paper.score_items(j, items))
        chimera = asyncio.run(fast_paper.score_items(j, controls.chimeras(FEATURES, 6, 0)))
        perm = asyncio.run(fast_paper.score_items(j, controls.permuted(items, 0)))
        retest = asyncio.run(fast_paper.score_items(j, controls.reordered(items, 1), seed=1))
    with serve_fake_judge(random_digits("01")) as server:
        shuffled = asyncio.run(
            detection.classify(
                judge(server.url, tmp_path, "r"), "detection", cases, controls.shuffled(explanations, 0), 0
            )
        )
    fakes = asyncio.run(
        controls.fake_judges(judge("http://127.0.0.1:1", tmp_path).config, cases, explanations, items, 0)
    )
    assert (
        all(b == 0.5 for b in fakes["constant"]["balanced_accuracy"])
        and fakes["constant"]["share_4_5"] == 1.0
    )
    found = controls.checks(
        shuffled_summary=detection.summarise(shuffled),
        chimera_summary=fast_paper.summarise(chimera),
        drop=controls.score_drop(real, perm),
        alpha=controls.metrics.krippendorff_alpha([[s.score for s in real], [s.score for s in retest]]),
        fakes=fakes,
        parse_failure_rate=0.0,
    )
    by_name = {c.name: c for c in found}
    assert by_name["chimera"].passed is False and by_name["chimera"].value == 1.0
    assert by_name["permuted_activations"].passed is False
    assert by_name["test_retest"].passed is False and "undefined" in by_name["test_retest"].detail
    assert by_name["constant_judge"].passed is True and by_name["parse_failures"].passed is True
    assert by_name["random_sae"].passed is None
    result = controls.verdict(found)
    assert result["judge_validated"] is False
    assert result["verdict"].startswith("judge NOT validated: ") and "chimera" in result["verdict"]
    assert "random_sae" in result["not_run"] and result["thresholds"]["test_retest"].endswith("0.67")


def test_verdict_passes_only_when_every_check_that_ran_passed():
    good = [controls.Check("chimera", 0.0, True), controls.Check("random_sae", None, None)]
    assert controls.verdict(good)["verdict"] == "judge validated"
    assert controls.verdict([controls.Check("constant_judge", {}, True)])["judge_validated"] is False

"""Labels through the command line: `interp label` stores a run's labels, `features` shows and searches them,
`chat` names the steered features."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from apps.cli import main
from hub import save_sae
from hub.labels import LABELS_FILE, read_labels
from tests.conftest import CHAT_DATA, build_tiny_model, read_conversations, save_tiny_model
from tests.hub.label_factory import label_sae, write_run
from tests.steer.helpers import random_sae
from tests.train.test_features import PLANTED, planted_sae

N = 16


@pytest.fixture(scope="module")
def saved(chatml_tokenizer, tmp_path_factory):
    """(model folder, SAE folder) of a tiny Llama and an SAE whose feature PLANTED fires on <|im_start|>."""
    root = tmp_path_factory.mktemp("labels_cli")
    model = save_tiny_model(root / "model", chatml_tokenizer)
    save_sae(planted_sae(model, chatml_tokenizer, read_conversations(n=N)), root / "sae")
    return root / "model", root / "sae"


@pytest.fixture
def sae_dir(tmp_path):
    sae = random_sae(64, 32)
    sae.cfg.metadata["hook_name"] = "blocks.1.hook_resid_post"
    return save_sae(sae, tmp_path / "sae")


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_interp_label_stores_runs_side_by_side(sae_dir, tmp_path):
    write_run(tmp_path / "a", sae_dir, judge="judge-a")
    result = _invoke(["interp", "label", sae_dir, "--from", tmp_path / "a"])
    assert result.exit_code == 0, result.output
    assert "stored judge-a / fast-paper (4 features, quality 0.62" in result.output
    assert "stored judge-a / detection (4 features" in result.output
    assert "default labelling: judge-a / fast-paper" in result.output
    assert f"wrote {sae_dir / LABELS_FILE}" in result.output
    write_run(tmp_path / "b", sae_dir, judge="judge-b", labels={3: ("thanks", 5, "thank you", 1.0, 0.01)})
    assert _invoke(["interp", "label", sae_dir, "--from", tmp_path / "b"]).exit_code == 0
    again = _invoke(["interp", "label", sae_dir, "--from", tmp_path / "a"])
    assert again.exit_code == 0, again.output
    assert again.output.count("note: ") == 2 and "replaced the labelling of judge 'judge-a'" in again.output
    judges = sorted({lab.judge_model for lab in read_labels(sae_dir).labellings})
    assert judges == ["judge-a", "judge-b"], "storing a run never removes another judge's labels"


def test_interp_label_refuses_what_does_not_belong(sae_dir, tmp_path):
    other = save_sae(random_sae(64, 32, seed=3), tmp_path / "other")
    write_run(tmp_path / "run", other)
    result = _invoke(["interp", "label", sae_dir, "--from", tmp_path / "run"])
    assert result.exit_code == 1 and "scored another SAE" in result.output, result.output
    assert not (sae_dir / LABELS_FILE).exists()
    result = _invoke(["interp", "label", sae_dir, "--from", tmp_path / "nothing"])
    assert result.exit_code == 1 and "no explanations.json in" in result.output
    result = _invoke(["interp", "label", tmp_path / "missing", "--from", tmp_path / "run"])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_features_search(sae_dir, tmp_path):
    label_sae(sae_dir, tmp_path / "run")
    result = _invoke(["features", sae_dir, "--search", "polite tone", "--top", "5"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("labels: judge-a / fast-paper")
    assert lines[1].split() == ["match", "feature", "score", "density", "label"]
    first = lines[2].split()
    assert first[1:5] == ["3", "5", "1.20e-02", "polite"], "the best match first, with score and density"
    assert float(first[0]) > float(lines[3].split()[0]) > 0, "the match score is shown, best first"
    assert lines[3].split()[1] == "7", "'tone of the system prompt' matches one word"
    empty = _invoke(["features", sae_dir, "--search", ""])
    assert empty.exit_code == 0 and "no feature label matches ''" in empty.output
    unlabelled = save_sae(random_sae(64, 32), tmp_path / "plain")
    missing = _invoke(["features", unlabelled, "--search", "tone"])
    assert missing.exit_code == 1 and "has no labels (explanations.json)" in missing.output
    assert "--data" in _invoke(["features", sae_dir]).output, "without --search, --data is needed"


def test_features_table_shows_labels(saved, tmp_path):
    model_dir, sae_dir = saved
    args = ["features", sae_dir, "--data", CHAT_DATA / "gpteacher.jsonl", "--model", model_dir, "--n", N]
    plain = _invoke([*args, "--top", "3"])
    assert plain.exit_code == 0, plain.output
    assert "unlabelled" not in plain.output, "a folder without labels prints as before"
    label_sae(sae_dir, tmp_path / "run", labels={PLANTED: ("start of a turn", 5, "<|im_start|>", 1.0, 0.1)})
    try:
        result = _invoke([*args, "--top", "3"])
        assert result.exit_code == 0, result.output
        row = next(line for line in result.output.splitlines() if f"feature {PLANTED:6d}" in line)
        assert row.endswith("'start of a turn'"), row
        assert "(unlabelled)" in result.output, "features without a label say so"
        contexts = _invoke([*args, "--feature", PLANTED, "--contexts", "2", "--no-color"])
        assert f"feature {PLANTED} 'start of a turn' at layer" in contexts.output, contexts.output
    finally:
        (sae_dir / LABELS_FILE).unlink()


def test_chat_names_the_steered_features(saved, tmp_path):
    model_dir, sae_dir = saved
    label_sae(sae_dir, tmp_path / "run", labels={3: ("polite tone", 5, "politeness", 1.0, 0.1)})
    try:
        args = ["chat", "--model", model_dir, "--sae", sae_dir, "--feature", 3, "--strength", 8]
        result = _invoke([*args, "--max-new-tokens", 2, "--json", "Hi"])
        assert result.exit_code == 0, result.output
        steering = json.loads(result.stdout.splitlines()[-1])["steering"]
        assert steering == "steered (L1 #3 'polite tone' add 8 @special)"
    finally:
        (sae_dir / LABELS_FILE).unlink()


def test_label_what_interp_run_wrote(chatml_tokenizer, tmp_path):
    """The whole path on a real run: `run_interp` against a scripted judge over HTTP, then `interp label`."""
    from apps.interp.fake_judge import serve_fake_judge
    from apps.interp.judge import JudgeConfig
    from apps.interp.run import InterpConfig, run_interp
    from hub import load_sae
    from tests.apps.interp.test_run import scripted
    from tests.train.test_interp_collect import random_sae as firing_sae
    from train.interp.collect import CollectConfig

    model = build_tiny_model("llama", len(chatml_tokenizer))
    conversations = read_conversations(n=30)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8")
    sae = save_sae(firing_sae(model, chatml_tokenizer, conversations, 0), tmp_path / "sae")
    run = tmp_path / "run"
    with serve_fake_judge(scripted) as server:
        judge = JudgeConfig(url=server.url, model="scripted", cache_dir=run / "judge-cache", backoff_s=0.0)
        config = InterpConfig(sae=str(sae), data=[str(data)], out=run, judge=judge, features=3,
                              collect=CollectConfig(instances=30, split="all", model="tiny-llama"))  # fmt: skip
        result = run_interp(config, model=model, tokenizer=chatml_tokenizer)
    stored = _invoke(["interp", "label", sae, "--from", run])
    assert stored.exit_code == 0, stored.output
    scored = {f["feature"]: f for f in result["features"]}
    labels = load_sae(sae).labels
    assert labels.judge_model == "scripted" and labels.date == result["settings"]["date"]
    assert sorted(labels.features) == sorted(scored), "every scored feature is labelled"
    for index, feature in scored.items():
        assert labels.get(index) == feature["name"] == "chat tokens"
        assert labels.features[index].density == pytest.approx(feature["density"])
    scorers = {lab.scorer for lab in read_labels(sae).labellings}
    assert scorers == {"fast-paper", "detection", "fuzzing"}
    hits = labels.search("chat", limit=10)
    assert sorted(h.feature for h in hits) == sorted(scored)

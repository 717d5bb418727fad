"""lm-eval through the `fast-steer` adapter on local MMLU / GSM8K items, and `fast-steer lm-eval`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from apps.cli import main
from apps.evaluation.lm_eval.model import FastSteerLM, UnsteeredError
from apps.evaluation.lm_eval.tasks import materialize_tasks
from hub.sae_io import save_sae
from steer import Intervention, SAEConfig, build_sae
from tests.conftest import EVAL_DATA, save_tiny_model

MMLU_TASK = "mmlu_local_abstract_algebra"
LAYER = 1


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    local = materialize_tasks(EVAL_DATA, tmp_path_factory.mktemp("tasks"))
    return local, TaskManager(include_path=str(local.include_path), include_defaults=False)


@pytest.fixture(scope="module")
def tiny(chatml_tokenizer, tmp_path_factory):
    """A saved tiny Llama, an SAE folder for its layer 1 and a strong `add` spec file pointing at it."""
    root = tmp_path_factory.mktemp("tiny_lm_eval")
    model = save_tiny_model(root / "model", chatml_tokenizer)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="standard", d_in=model.config.hidden_size, d_sae=16))
    save_sae(sae, root / "sae")
    spec = {
        "layer": LAYER,
        "sae": str(root / "sae"),
        "edits": [{"feature": 3, "op": "add", "strength": 30.0}],
    }
    (root / "spec.json").write_text(json.dumps(spec))
    return model, chatml_tokenizer, sae, root


def _loglikelihoods(lm, task_manager) -> list[float]:
    """Per-choice loglikelihoods of the first 5 items of MMLU abstract algebra, chat template applied."""
    results = simple_evaluate(
        model=lm, tasks=[MMLU_TASK], limit=5, task_manager=task_manager, apply_chat_template=True
    )
    return [resp[0][0] for s in results["samples"][MMLU_TASK] for resp in s["resps"]]


def _generations(lm, task_manager) -> list[str]:
    results = simple_evaluate(
        model=lm,
        tasks=["gsm8k_local"],
        limit=2,
        num_fewshot=0,
        task_manager=task_manager,
        apply_chat_template=True,
        gen_kwargs={"max_gen_toks": 6},
    )
    return [s["resps"][0][0] for s in results["samples"]["gsm8k_local"]]


def test_local_tasks_materialize(local_tasks, tmp_path):
    local, tm = local_tasks
    with open(EVAL_DATA / "mmlu_test.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    subjects = {row["subject"] for row in rows}
    local_names = {"gsm8k_local", "ifeval_local", "arc_easy_local"}
    assert len(subjects) == 57 and set(local.tasks) == {f"mmlu_local_{s}" for s in subjects} | local_names
    assert local.groups == ["mmlu_local"]
    assert str(EVAL_DATA.resolve()) in (local.include_path / "_mmlu_local_template_yaml").read_text()
    tasks = tm.load([MMLU_TASK, "gsm8k_local"])["tasks"]
    algebra = [row for row in rows if row["subject"] == "abstract_algebra"]
    docs = list(tasks[MMLU_TASK].test_docs())
    assert len(docs) == len(algebra) and docs[0]["question"] == algebra[0]["question"]
    assert {d["subject"] for d in tasks[MMLU_TASK].fewshot_docs()} == {"abstract_algebra"}
    assert len(tasks["gsm8k_local"].test_docs()) == 1319
    with pytest.raises(FileNotFoundError, match="no benchmark files"):
        materialize_tasks(tmp_path, tmp_path / "out")


def test_adapter_plain_empty_and_strong_spec(tiny, local_tasks):
    model, tok, sae, _ = tiny
    _, tm = local_tasks
    stock = _loglikelihoods(HFLM(pretrained=model, tokenizer=tok, batch_size=4), tm)
    plain = FastSteerLM(pretrained=model, tokenizer=tok, batch_size=4)
    assert _loglikelihoods(plain, tm) == stock
    empty = Intervention(layer=LAYER, sae=sae, edits=[])
    assert (
        _loglikelihoods(FastSteerLM(pretrained=model, tokenizer=tok, spec=empty, batch_size=4), tm) == stock
    )
    strong = Intervention(layer=LAYER, sae=sae, edits=[{"feature": 3, "op": "add", "strength": 30.0}])
    steered_lm = FastSteerLM(pretrained=model, tokenizer=tok, spec=strong, batch_size=4)
    steered = _loglikelihoods(steered_lm, tm)
    assert len(steered) == len(stock) == 20
    assert max(abs(a - b) for a, b in zip(steered, stock, strict=True)) > 1e-3
    with steered_lm.steering_disabled():
        assert _loglikelihoods(steered_lm, tm) == stock
    # Generation requests are steered too (the prompt's chat-template tokens and every generated token).
    assert _generations(steered_lm, tm) != _generations(plain, tm)
    with steered_lm.steering_disabled():
        assert _generations(steered_lm, tm) == _generations(plain, tm)


def test_generated_positions_under_lm_eval_with_and_without_cache(tiny, local_tasks):
    """HFLM calls `model.generate` itself: the runtime finds the prompt boundary, cached or recomputed."""
    model, tok, sae, _ = tiny
    _, tm = local_tasks
    spec = Intervention(
        layer=LAYER, sae=sae, edits=[{"feature": 3, "op": "add", "strength": 30.0}], positions="generated"
    )
    plain = _generations(FastSteerLM(pretrained=model, tokenizer=tok, batch_size=2), tm)
    cached = _generations(FastSteerLM(pretrained=model, tokenizer=tok, spec=spec, batch_size=2), tm)
    recomputed_lm = FastSteerLM(pretrained=model, tokenizer=tok, spec=spec, batch_size=2, use_cache="false")
    assert recomputed_lm.use_cache is False
    assert _generations(recomputed_lm, tm) == cached
    assert cached != plain, "generated positions are edited under lm-eval"
    assert [c[:1] for c in cached] == [p[:1] for p in plain], "the prompt (and so the first token) is not"
    with pytest.raises(ValueError, match="use_cache='maybe' must be true or false"):
        FastSteerLM(pretrained=model, tokenizer=tok, use_cache="maybe")


def test_adapter_model_args_errors(tiny):
    _, _, _, root = tiny
    with pytest.raises(ValueError, match="no spec=FILE"):
        FastSteerLM.create_from_arg_string(f"pretrained={root / 'model'},sae={root / 'sae'}")
    with pytest.raises(ValueError, match="does not exist"):
        FastSteerLM.create_from_arg_string(f"pretrained={root / 'model'},spec={root / 'missing.json'}")
    lm = FastSteerLM.create_from_arg_string(
        f"pretrained={root / 'model'},spec={root / 'spec.json'}", {"device": "cpu"}
    )
    assert lm.steering_active and lm.specs[0].edits[0].strength == 30.0


USER_TASK = """task: user_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{path}"
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_cli_hands_over_to_lm_eval(tiny, tmp_path):
    """lm-eval's own CLI runs (default --model fast-steer), with the user's --include_path kept beside ours."""
    _, _, _, root = tiny
    user = tmp_path / "user_tasks"
    user.mkdir()
    (user / "user_task.yaml").write_text(USER_TASK.format(path=EVAL_DATA / "mmlu_val.jsonl"))
    args = ["lm-eval", "--model_args", f"pretrained={root / 'model'}", "--tasks", f"{MMLU_TASK},user_task"]
    args += [
        "--limit",
        "2",
        "--device",
        "cpu",
        "--include_path",
        str(user),
        "--output_path",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (
        "fast-steer (" in result.output
        and "abstract_algebra" in result.output
        and "user_task" in result.output
    )
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert len(saved) == 1
    results = json.loads(saved[0].read_text())["results"]
    assert results[MMLU_TASK]["sample_len"] == 2 and results["user_task"]["sample_len"] == 2


def test_cli_compare_one_table(tiny, tmp_path):
    _, _, _, root = tiny
    out = tmp_path / "compare.json"
    args = ["lm-eval", "--compare", "--model_args", f"pretrained={root / 'model'},spec={root / 'spec.json'}"]
    args += ["--tasks", MMLU_TASK, "--limit", "3", "--apply_chat_template", "--device", "cpu"]
    args += ["--log_samples", "--output_path", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "| Task " in line)
    assert "Base" in header and "Steered" in header
    assert any(line.startswith(f"| {MMLU_TASK}") and "| acc" in line for line in result.output.splitlines())
    payload = json.loads(out.read_text())
    assert payload["rows"][0]["task"] == MMLU_TASK and payload["rows"][0]["metric"] == "acc"
    base = [s["resps"] for s in payload["base"]["samples"][MMLU_TASK]]
    steered = [s["resps"] for s in payload["steered"]["samples"][MMLU_TASK]]
    assert len(base) == 3 and base != steered

    no_spec = ["lm-eval", "--compare", "--model_args", f"pretrained={root / 'model'}", "--tasks", MMLU_TASK]
    result = CliRunner().invoke(main, [*no_spec, "--limit", "1", "--device", "cpu"])
    assert result.exit_code != 0 and "needs a steering spec" in result.output
    result = CliRunner().invoke(
        main, ["lm-eval", "--eval-data", str(tmp_path / "nowhere"), "--tasks", MMLU_TASK]
    )
    assert result.exit_code != 0 and "nowhere" in result.output


@pytest.mark.integration
def test_default_model_spec_changes_mmlu_scores(local_tasks, tmp_path):
    """SmolLM2 on 5 MMLU items: a strong special-token spec changes the loglikelihoods, an empty one does not."""
    _, tm = local_tasks
    torch.manual_seed(0)
    save_sae(build_sae(SAEConfig(architecture="standard", d_in=576, d_sae=64)), tmp_path / "sae")
    for name, edits in (("strong", [{"feature": 5, "op": "add", "strength": 60.0}]), ("empty", [])):
        spec = {"layer": 10, "sae": str(tmp_path / "sae"), "edits": edits, "positions": "special"}
        (tmp_path / f"{name}.json").write_text(json.dumps(spec))
    lm = FastSteerLM.create_from_arg_string(
        f"pretrained=default,spec={tmp_path / 'strong.json'}", {"batch_size": 4}
    )
    steered = _loglikelihoods(lm, tm)
    with lm.steering_disabled():
        plain = _loglikelihoods(lm, tm)
    lm.use_specs(str(tmp_path / "empty.json"))
    assert _loglikelihoods(lm, tm) == plain
    assert max(abs(a - b) for a, b in zip(steered, plain, strict=True)) > 1e-2


def test_dtype_auto_means_what_hub_means(tiny):
    """`dtype=auto` in the adapter is `hub.load_model`'s auto (`hub.fast_dtype` of the device), one rule."""
    from hub import fast_dtype, load_model
    from steer.sae import dtype_from_name

    *_, root = tiny
    lm = FastSteerLM(pretrained=str(root / "model"), dtype="auto", device="cpu", batch_size=1)
    assert lm.steered.model.dtype == dtype_from_name(fast_dtype("cpu"))
    assert lm.steered.model.dtype == load_model(str(root / "model"), dtype="auto", device="cpu").model.dtype


def _scores(lm, task_manager, **kw) -> dict:
    return simple_evaluate(model=lm, tasks=[MMLU_TASK], limit=3, task_manager=task_manager, **kw)


def test_special_spec_without_chat_template_stops_the_run(tiny, local_tasks):
    """A `special` spec on prompts without the chat template edits nothing: the run stops and says why,
    unless allow_unsteered; with the template, each task's count is kept."""
    model, tok, sae, _ = tiny
    _, tm = local_tasks
    spec = Intervention(layer=LAYER, sae=sae, edits=[{"feature": 3, "op": "add", "strength": 30.0}])
    lm = FastSteerLM(pretrained=model, tokenizer=tok, spec=spec, batch_size=4)
    with pytest.raises(UnsteeredError, match="--apply_chat_template") as caught:
        _scores(lm, tm)
    assert "edited no position in task " + MMLU_TASK in str(caught.value)
    assert "--allow-unsteered" in str(caught.value)
    assert lm.steered_positions == {MMLU_TASK: [0]}
    _scores(lm, tm, apply_chat_template=True)
    assert lm.steered_positions[MMLU_TASK][0] > 0
    allowed = FastSteerLM(pretrained=model, tokenizer=tok, spec=spec, batch_size=4, allow_unsteered="true")
    results = _scores(allowed, tm)
    assert results["results"][MMLU_TASK]["sample_len"] == 3 and allowed.steered_positions == {MMLU_TASK: [0]}


def test_cli_prints_counts_and_stops_when_unsteered(tiny, tmp_path):
    _, _, _, root = tiny
    args = ["lm-eval", "--model_args", f"pretrained={root / 'model'},spec={root / 'spec.json'}"]
    args += ["--tasks", MMLU_TASK, "--limit", "2", "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "edited no position" in result.output and "--apply_chat_template" in result.output
    assert f"{MMLU_TASK}: steered 0 positions" in result.output
    result = CliRunner().invoke(main, [*args, "--allow-unsteered"])
    assert result.exit_code == 0, result.output
    assert f"{MMLU_TASK}: steered 0 positions" in result.output and "going on" in result.output
    result = CliRunner().invoke(main, [*args, "--apply_chat_template"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if f"{MMLU_TASK}: steered" in x)
    assert int(line.split("steered ")[1].split()[0]) > 0
    result = CliRunner().invoke(main, [*args, "--allow-unsteered", "--model", "hf"])
    assert result.exit_code != 0 and "--allow-unsteered applies to" in result.output


@pytest.mark.parametrize("compare", [False, True])
def test_an_unknown_task_is_one_clear_error(tiny, compare):
    _, _, _, root = tiny
    args = ["lm-eval", "--model_args", f"pretrained={root / 'model'}", "--tasks", "typo_task", "--limit", "2"]
    result = CliRunner().invoke(main, args + (["--compare"] if compare else []))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Tasks not found: typo_task" in result.output and "mmlu_local" in result.output
    assert "lm-eval ls tasks" in result.output


def test_a_system_message_is_folded_where_the_template_refuses_it():
    """Gemma 2's template raises on a system role: the adapter folds it into the first user turn (HFLM drops it)."""
    from steer.chat_template import fold_system
    from tests.chat_families import family_model, family_tokenizer

    tok = family_tokenizer("gemma2")
    lm = FastSteerLM(pretrained=family_model("gemma2", n_layers=1), tokenizer=tok, device="cpu", batch_size=1)
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello there"}]
    rendered = lm.apply_chat_template(chat)
    assert rendered == tok.apply_chat_template(fold_system(chat), tokenize=False, add_generation_prompt=True)
    assert "Answer in French.\n\nHello there" in rendered

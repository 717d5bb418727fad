"""`fast-steer experiment reproduce` (FAST vs BT(F) vs BT(P)), `sweep` (steering), `steer-eval`
(the steering evaluation: IFEval dev/test, ARC-Easy, controls, paired bootstrap CIs), `interp` (the
auto-interpretability study of the three JumpReLU SAEs) and `report` (docs/results.md from the JSON files
those wrote)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from apps.cli.interp import judge_config, judge_options
from apps.cli.options import (
    Numbers,
    Words,
    config_device_option,
    config_model_option,
    config_option,
    device_option,
)
from apps.cli.train import _Tokens
from steer.errors import MissingFileError
from steer.sae import architectures
from train.sequences import METHOD_LABELS, METHODS

REPRO = "train.experiment:ReproduceConfig"
SWEEP = "apps.evaluation.sweep:SweepConfig"
STEER_EVAL = "apps.evaluation.steer_eval.config:SteerEvalConfig"


def default_out() -> Path:
    from hub.cache import cache_dir

    return cache_dir() / "experiments" / "reproduce"


@click.group("experiment")
def experiment_group() -> None:
    """Reproduce the FAST paper's comparison and its steering sweep on a model (default: SmolLM2)."""


@experiment_group.command("reproduce")
@config_model_option(REPRO)
@config_device_option(REPRO)
@config_option(REPRO, "layer", "--layer", type=int, help="Residual stream after decoder block L.")
@config_option(REPRO, "tokens", "--tokens", type=_Tokens(), help="Training tokens per SAE.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Experiment folder.  "
              "[default: <fast-steer cache>/experiments/reproduce]")  # fmt: skip
@config_option(REPRO, "chat_data", "--data", multiple=True, type=click.Path(exists=True),
               help="Conversations (FAST, BT(F), held-out).")  # fmt: skip
@config_option(REPRO, "pretrain_data", "--pretrain-data", multiple=True, type=click.Path(exists=True),
               help="Pretraining text (BT(P)).")  # fmt: skip
@config_option(REPRO, "methods", "--method", "methods", multiple=True, type=click.Choice(METHODS),
               help="Methods to compare.")  # fmt: skip
@config_option(REPRO, "archs", "--arch", "archs", multiple=True, type=click.Choice(architectures()),
               help="SAE architectures (trained side by side on each method's stream).")  # fmt: skip
@config_option(REPRO, "expansion", "--expansion", type=int, help="d_sae / d_in.")
@config_option(REPRO, "preset", "--preset", type=click.Choice(["default", "paper"]))
@config_option(
    REPRO, "batch_size", "--batch-size", type=int, help="Tokens per optimiser step.  [default: the preset's]"
)
@config_option(REPRO, "l1_coefficient", "--l1", "l1_coefficient", type=float,
               help="L1 coefficient of standard SAEs.  [default: the preset's]")  # fmt: skip
@config_option(REPRO, "l0_coefficient", "--l0", "l0_coefficient", type=float,
               help="L0 coefficient of jumprelu SAEs.  [default: the preset's]")  # fmt: skip
@config_option(REPRO, "l1_grid", "--l1-grid", type=Numbers(), help="More L1 coefficients (comma-separated) for the "
               "L0-matched frontier, trained in the first variant.")  # fmt: skip
@config_option(REPRO, "l0_grid", "--l0-grid", type=Numbers(), help="More L0 coefficients (comma-separated) for the "
               "L0-matched frontier, trained in the first variant.")  # fmt: skip
@config_option(REPRO, "threshold_grid", "--threshold-grid", type=Numbers(), help="More jumprelu initial thresholds "
               "(comma-separated) at the fixed --l0, trained in the first variant (on CPU budgets the start sets "
               "jumprelu's L0).")  # fmt: skip
@config_option(REPRO, "variants", "--variant", "variants", multiple=True, type=click.Choice(["all", "no-first"]),
               help="Training variants: every token (as in the paper) or position 0 left out; the first carries "
               "the grids.")  # fmt: skip
@click.option("--autocast", is_flag=True, help="bf16 autocast of the SAE matmuls (~3x faster on AMX CPUs).")
@config_option(REPRO, "gsnr_every", "--gsnr-every", type=int,
               help="Steps between gradient signal-to-noise measurements (0: off).")  # fmt: skip
@config_option(REPRO, "buffer_tokens", "--buffer-tokens", type=int, help="Mixing buffer size.")
@config_option(REPRO, "max_len", "--max-len", type=int, help="FAST truncation per conversation.")
@config_option(
    REPRO, "held_out_fraction", "--held-out-fraction", type=float, help="Held-out share (content hash)."
)
@config_option(REPRO, "eval_conversations", "--eval-conversations", type=int, help="Held-out conversations.")
@config_option(REPRO, "model_dtype", "--dtype", "model_dtype",
               help="Model dtype (harvest, eval; auto: the one OUT was harvested in, else bfloat16 on CUDA and AMX "
               "CPUs, else float32; resolved and recorded in experiment.json).")  # fmt: skip
@config_option(REPRO, "seed", "--seed", type=int)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def reproduce_command(model_ref, device, layer, tokens, out_dir, data, pretrain_data, methods, archs, expansion, preset,
                      batch_size, l1_coefficient, l0_coefficient, l1_grid, l0_grid, threshold_grid, variants, autocast, gsnr_every, buffer_tokens, max_len, held_out_fraction, eval_conversations, model_dtype, seed,
                      quiet) -> None:  # fmt: skip
    """Harvest FAST, BT(F) and BT(P) activations once each, train every SAE from them with identical
    settings, evaluate them on the same held-out conversations, and write results.{json,md,png} and
    frontier.png. Finished runs are reused, unfinished ones resumed."""
    from train.experiment import ReproduceConfig, reproduce

    cfg = ReproduceConfig(
        out=out_dir or default_out(),
        model=model_ref,
        device=device,
        layer=layer,
        tokens=tokens,
        chat_data=list(data),
        pretrain_data=list(pretrain_data),
        methods=methods,
        archs=archs,
        expansion=expansion,
        preset=preset,
        batch_size=batch_size,
        l1_coefficient=l1_coefficient,
        l0_coefficient=l0_coefficient,
        l1_grid=l1_grid,
        l0_grid=l0_grid,
        threshold_grid=threshold_grid,
        variants=variants,
        autocast=autocast,
        gsnr_every=gsnr_every,
        buffer_tokens=buffer_tokens,
        max_len=max_len,
        held_out_fraction=held_out_fraction,
        model_dtype=model_dtype,
        eval_conversations=eval_conversations,
        seed=seed,
    )
    result = reproduce(cfg, progress=not quiet, command=command_line())
    from train.experiment import plan_runs

    reused = [
        f"{r.method}/{r.variant}" for r in plan_runs(cfg) if f"{r.method}/{r.variant}" not in result.trained
    ]
    click.echo(
        f"trained: {', '.join(result.trained) or 'none'}; reused: {', '.join(reused) or 'none'}", err=True
    )
    click.echo(result.paths["markdown"].read_text(encoding="utf-8"))
    click.echo("wrote " + ", ".join(str(p) for p in result.paths.values()), err=True)


def _steering_run_options(fn):
    """Options `sweep` and `steer-eval` share: the held-out conversations, the model's dtype and device."""
    options = [
        click.option("--conversations", "n_conversations", type=int, default=100, show_default=True,
                     help="Held-out conversations for feature discovery and the norm scale."),
        click.option("--data", multiple=True, type=click.Path(exists=True),
                     help="Conversations for the held-out split when OUT has no heldout.jsonl.  [default: ../shared/data/chat]"),
        click.option("--dtype", "model_dtype", default="auto", show_default=True, help="Model dtype."),
        device_option,
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


@experiment_group.command("sweep")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The reproduce folder; results go to OUT/sweep.  [default: <fast-steer cache>/experiments/reproduce]")  # fmt: skip
@click.option("--sae", "sae_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="SAE folder to steer with.  [default: the FAST standard SAE of OUT]")  # fmt: skip
@click.option(
    "--model", "model_ref", help="Model reference.  [default: the one in OUT/experiment.json, or 'default']"
)
@config_option(SWEEP, "strengths", "--strengths", type=Numbers(),
               help="Comma-separated strengths, in %% of the median special-token residual norm.")  # fmt: skip
@click.option("--feature", type=int,
              help="Steer this feature instead of the top feature of the turn-opening token (<|im_start|> in ChatML).")  # fmt: skip
@config_option(SWEEP, "mmlu_subjects", "--subjects", type=Words(),
               help="Comma-separated MMLU subjects (local data).")  # fmt: skip
@config_option(SWEEP, "mmlu_limit", "--mmlu-limit", type=int, help="MMLU items per subject (0 = all).")
@config_option(SWEEP, "max_new_tokens", "--max-new-tokens", type=int, help="Length of the greedy replies.")
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with mmlu_{test,val,dev}.jsonl.  [default: ../shared/data/eval]")  # fmt: skip
@_steering_run_options
def sweep_command(out_dir, sae_dir, model_ref, strengths, feature, subjects, mmlu_limit, max_new_tokens,
                  n_conversations, data, eval_data, model_dtype, device, quiet) -> None:  # fmt: skip
    """Add the top turn-opening-token feature (<|im_start|> in ChatML) of the FAST SAE at special positions at
    several strengths: greedy replies to fixed prompts and a local MMLU score per strength (sweep.{json,md,png})."""
    from apps.evaluation.sweep import SweepConfig, run_sweep
    from hub import load_model
    from train.data import shared_data_dir
    from train.experiment import load_config

    out = out_dir or default_out()
    recorded = load_config(out)
    sae_dir = sae_dir or _steering_sae(out, "fast", "--sae")
    conversations = _conversations(out, list(data) or (recorded and recorded.chat_data), n_conversations)
    cfg = SweepConfig(
        sae_dir=sae_dir,
        out=out / "sweep",
        strengths=strengths,
        max_new_tokens=max_new_tokens,
        mmlu_subjects=subjects,
        mmlu_limit=mmlu_limit or None,
        eval_data=eval_data or shared_data_dir("eval"),
        feature=feature,
    )
    ref = model_ref or (recorded.model if recorded else "default")
    model, tok = load_model(ref, dtype=model_dtype, device=device)
    result = run_sweep(cfg, model, tok, conversations, model_ref=ref, progress=not quiet)
    click.echo((cfg.out / "sweep.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {cfg.out}/sweep.{{json,md,png}} in {result.wall_s:.0f} s", err=True)


@experiment_group.command("steer-eval")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The reproduce folder; results go to OUT/steer_eval.  [default: <fast-steer cache>/experiments/reproduce]")  # fmt: skip
@click.option("--fast-sae", type=click.Path(file_okay=False, path_type=Path),
              help="FAST SAE folder.  [default: OUT's FAST SAE for steering: fixed coefficient, no-first variant, lowest Δ LM loss]")  # fmt: skip
@click.option("--btf-sae", type=click.Path(file_okay=False, path_type=Path),
              help="BT(F) SAE folder.  [default: chosen as for FAST]")  # fmt: skip
@click.option(
    "--model", "model_ref", help="Model reference.  [default: the one in OUT/experiment.json, or 'default']"
)
@config_option(STEER_EVAL, "strengths", "--strengths", type=Numbers(),
               help="Comma-separated positive strengths, in %% of the median special-token residual norm.")  # fmt: skip
@config_option(STEER_EVAL, "dev", "--dev", "n_dev", type=int, help="IFEval dev prompts (strength choice).")
@config_option(STEER_EVAL, "test", "--test", "n_test", type=int, help="IFEval test prompts (reported).")
@config_option(STEER_EVAL, "arc", "--arc", "n_arc", type=int, help="ARC-Easy test items.")
@config_option(STEER_EVAL, "max_new_tokens", "--max-new-tokens", type=int, help="IFEval reply length limit.")
@config_option(STEER_EVAL, "seed", "--seed", type=int, help="Split, random-direction and bootstrap seed.")
@config_option(STEER_EVAL, "resamples", "--resamples", type=int, help="Bootstrap resamples.")
@config_option(STEER_EVAL, "batch_size", "--batch-size", type=int)
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with ifeval_input_data.jsonl and arc_easy_*.jsonl.  [default: ../shared/data/eval]")  # fmt: skip
@_steering_run_options
def steer_eval_command(out_dir, fast_sae, btf_sae, model_ref, strengths, n_dev, n_test, n_arc, max_new_tokens, seed,
                       resamples, batch_size, n_conversations, data, eval_data, model_dtype, device, quiet) -> None:  # fmt: skip
    """Plain, prompt-only, FAST / BT(F) top turn-opening-token feature and a random direction: strength chosen on
    an IFEval dev split, IFEval and ARC-Easy reported on test with paired bootstrap CIs (steer_eval.{json,md,png}).
    Finished cells are reused."""
    from apps.evaluation.steer_eval import SteerEvalConfig, run_steer_eval
    from hub import load_model
    from train.data import shared_data_dir
    from train.experiment import load_config

    out = out_dir or default_out()
    recorded = load_config(out)
    cfg = SteerEvalConfig(
        fast_sae=fast_sae or _steering_sae(out, "fast", "--fast-sae"),
        btf_sae=btf_sae or _steering_sae(out, "bt-f", "--btf-sae"),
        out=out / "steer_eval",
        strengths=strengths,
        dev=n_dev,
        test=n_test,
        arc=n_arc,
        max_new_tokens=max_new_tokens,
        eval_data=eval_data or shared_data_dir("eval"),
        batch_size=batch_size,
        seed=seed,
        resamples=resamples,
    )
    conversations = _conversations(out, list(data) or (recorded and recorded.chat_data), n_conversations)
    ref = model_ref or (recorded.model if recorded else "default")
    model, tok = load_model(ref, dtype=model_dtype, device=device)
    report = run_steer_eval(
        cfg, model, tok, conversations, model_ref=ref, progress=not quiet, command=command_line()
    )
    click.echo((cfg.out / "steer_eval.md").read_text(encoding="utf-8"))
    cells = report["cells"]
    click.echo(
        f"cells computed: {len(cells['computed'])}, reused: {len(cells['reused'])}; "
        f"wrote {cfg.out}/steer_eval.{{json,md,png}} in {report['wall_s']:.0f} s",
        err=True,
    )


@experiment_group.command("report")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The reproduce folder (results.json; steer_eval/ if it exists).  [default: <fast-steer cache>/experiments/reproduce]")  # fmt: skip
@click.option("--doc", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/results.md"),
              show_default=True, help="The document to write; the result files are copied beside it.")  # fmt: skip
@click.option("--steer-eval", "steer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The steer-eval folder (steer_eval.json), when its SAEs came from another reproduce folder.  [default: OUT/steer_eval]")  # fmt: skip
@click.option("--notes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Markdown prose (the reading of the results) placed after the computed verdicts.")  # fmt: skip
@click.option("--interp", "interp_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An interp run named after its method (fast/, bt-f/, bt-p/ with interp.json), or a folder holding them; repeatable.  [default: OUT/interp if it holds any]")  # fmt: skip
def report_command(out_dir, doc, steer_dir, notes, interp_dirs) -> None:
    """Write docs/results.md from the JSON files that `reproduce`, `steer-eval` and `interp` wrote (copied
    beside it)."""
    from apps.evaluation.results_doc import write_doc
    from apps.interp.run import INTERP_FILE

    out = out_dir or default_out()
    study = out / "interp"
    interp = list(interp_dirs) or ([study] if any(study.glob(f"*/{INTERP_FILE}")) else [])
    steer = steer_dir or out / "steer_eval"
    has_steer = (steer / "steer_eval.json").is_file()
    if steer_dir and not has_steer:
        raise click.BadParameter(f"{steer} holds no steer_eval.json: run `fast-steer experiment steer-eval` first",
                                 param_hint="--steer-eval")  # fmt: skip
    path = write_doc(out, steer if has_steer else None, doc, notes, interp)
    click.echo(f"wrote {path}", err=True)


INTERP = "apps.interp.run:InterpConfig"
COLLECT = "train.interp.collect:CollectConfig"


@experiment_group.command("interp")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The reproduce folder; results go to OUT/interp/<method>/.  [default: <fast-steer cache>/experiments/reproduce]")  # fmt: skip
@judge_options
@config_option(
    INTERP,
    "protocol",
    "--protocol",
    help="fast-paper | detection | fuzzing | all, or a comma-separated list.",
)
@config_option(
    INTERP, "controls", "--controls", is_flag=True, help="Run the controls and give a judge verdict."
)
@config_option(INTERP, "features", "--features", type=int, help="Features sampled per SAE (seeded).")
@config_option(COLLECT, "instances", "--instances", type=int, help="Held-out conversations collected.")
@config_option(INTERP, "seed", "--seed", type=int, help="Seeds the feature sample, test sets and controls.")
@config_device_option(COLLECT)
def interp_command(out_dir, judge_url, judge_model, protocol, controls, features, instances, seed, judge_concurrency,
                   judge_timeout, device) -> None:  # fmt: skip
    """Score the FAST, BT(F) and BT(P) JumpReLU SAEs of a reproduce folder (no-first variant) with a judge
    (key from $FAST_STEER_JUDGE_KEY or $OPENAI_API_KEY) into OUT/interp/<method>/interp.json."""
    from apps.interp.study import STUDY_DIR, run_study, study_template
    from train.interp.collect import CollectConfig

    out = out_dir or default_out()
    judge = judge_config(out / STUDY_DIR / "judge-cache", seed, judge_url, judge_model, judge_concurrency,
                         judge_timeout)  # fmt: skip
    template = study_template(out, judge, protocol=protocol, controls=controls, features=features, seed=seed,
                              collect=CollectConfig(instances=instances, device=device))  # fmt: skip
    for method, result in run_study(out, template).items():
        summary = result["summary"]
        share = (summary["fast_paper"] or {}).get("share_4_5") or {}
        detection = (summary["detection"] or {}).get("balanced_accuracy_median")
        verdict = summary["controls"]["verdict"] if summary["controls"] else "controls not run"
        click.echo(
            f"{METHOD_LABELS[method]}: share 4-5 {share.get('value')}, detection median {detection}; {verdict}"
        )
    click.echo(f"wrote {out / STUDY_DIR}/<method>/interp.json; then `fast-steer experiment report --out {out}`",
               err=True)  # fmt: skip


def _steering_sae(out: Path, method: str, option: str) -> Path:
    """The SAE of `method` that `reproduce` trained into `out` for steering (`train.experiment.steering_sae`)."""
    from train.experiment import steering_sae

    folder = steering_sae(out, method)
    if folder is None:
        raise MissingFileError(
            f"no trained {METHOD_LABELS[method]} SAE under {out / 'runs' / method}: run `fast-steer experiment reproduce --out {out}` "
            f"first, or pass {option} DIR"
        )
    return folder


def _conversations(out: Path, data: list[str] | None, n: int) -> list:
    from train.data import load_conversations, shared_data_dir
    from train.experiment import HELDOUT_FILE

    path = out / HELDOUT_FILE
    if path.is_file():
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    else:
        items = list(load_conversations(data or [str(shared_data_dir("chat"))], split="held_out").items)
    if not items:
        raise MissingFileError("no held-out conversations for feature discovery")
    return items[:n]


def command_line() -> str:
    """The command as the user ran it (recorded in the results files)."""
    return shlex.join(["fast-steer", *sys.argv[1:]])


def register(group: click.Group) -> None:
    group.add_command(experiment_group)

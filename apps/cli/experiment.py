"""`fast-steer experiment reproduce` (FAST vs BT(F) vs BT(P)), `sweep` (steering), `steer-eval`
(the steering evaluation: IFEval dev/test, ARC-Easy, controls, paired bootstrap CIs) and `report`
(docs/results.md from the JSON files those wrote)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from apps.cli.options import device_option, model_option
from apps.cli.train import _Tokens


def default_out() -> Path:
    from hub.cache import cache_dir

    return cache_dir() / "experiments" / "reproduce"


@click.group("experiment")
def experiment_group() -> None:
    """Reproduce the FAST paper's comparison and its steering sweep on a model (default: SmolLM2)."""


@experiment_group.command("reproduce")
@model_option
@device_option
@click.option(
    "--layer", type=int, default=15, show_default=True, help="Residual stream after decoder block L."
)
@click.option("--tokens", type=_Tokens(), default="1.5M", show_default=True, help="Training tokens per SAE.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Experiment folder.  "
              "[default: <fast-steer cache>/experiments/reproduce]")  # fmt: skip
@click.option("--data", multiple=True, type=click.Path(exists=True), help="Conversations (FAST, BT(F), held-out).  "
              "[default: ../shared/data/chat]")  # fmt: skip
@click.option("--pretrain-data", multiple=True, type=click.Path(exists=True), help="Pretraining text (BT(P)).  "
              "[default: ../shared/data/pretrain]")  # fmt: skip
@click.option("--method", "methods", multiple=True, type=click.Choice(["fast", "bt-f", "bt-p"]),
              help="Methods to compare.  [default: all three]")  # fmt: skip
@click.option("--arch", "archs", multiple=True, type=click.Choice(["standard", "jumprelu", "topk"]),
              help="SAE architectures (trained side by side on each method's stream).  [default: standard, jumprelu]")  # fmt: skip
@click.option("--expansion", type=int, default=8, show_default=True, help="d_sae / d_in.")
@click.option("--preset", type=click.Choice(["default", "paper"]), default="default", show_default=True)
@click.option("--batch-size", type=int, help="Tokens per optimiser step.  [default: the preset's]")
@click.option(
    "--l1", "l1_coefficient", type=float, help="L1 coefficient of standard SAEs.  [default: the preset's]"
)
@click.option(
    "--l0", "l0_coefficient", type=float, help="L0 coefficient of jumprelu SAEs.  [default: the preset's]"
)
@click.option("--l1-grid", default="", help="More L1 coefficients (comma-separated) for the L0-matched "
              "frontier, trained in the first variant.")  # fmt: skip
@click.option("--l0-grid", default="", help="More L0 coefficients (comma-separated) for the L0-matched "
              "frontier, trained in the first variant.")  # fmt: skip
@click.option("--threshold-grid", default="", help="More jumprelu initial thresholds (comma-separated) at the "
              "fixed --l0, trained in the first variant (on CPU budgets the start sets jumprelu's L0).")  # fmt: skip
@click.option("--variant", "variants", multiple=True, type=click.Choice(["all", "no-first"]),
              help="Training variants: every token (as in the paper) or position 0 left out; the first carries "
              "the grids.  [default: all]")  # fmt: skip
@click.option("--autocast", is_flag=True, help="bf16 autocast of the SAE matmuls (~3x faster on AMX CPUs).")
@click.option("--gsnr-every", type=int, default=0, show_default=True,
              help="Steps between gradient signal-to-noise measurements (0: off).")  # fmt: skip
@click.option("--buffer-tokens", type=int, default=65536, show_default=True, help="Mixing buffer size.")
@click.option(
    "--max-len", type=int, default=8192, show_default=True, help="FAST truncation per conversation."
)
@click.option(
    "--held-out-fraction", type=float, default=0.05, show_default=True, help="Held-out share (content hash)."
)
@click.option(
    "--eval-conversations", type=int, default=200, show_default=True, help="Held-out conversations."
)
@click.option(
    "--dtype",
    "model_dtype",
    default="auto",
    show_default=True,
    help="Model dtype (harvest, eval; auto: see train).",
)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def reproduce_command(model_ref, device, layer, tokens, out_dir, data, pretrain_data, methods, archs, expansion, preset,
                      batch_size, l1_coefficient, l0_coefficient, l1_grid, l0_grid, threshold_grid, variants, autocast, gsnr_every, buffer_tokens, max_len, held_out_fraction, eval_conversations, model_dtype, seed,
                      quiet) -> None:  # fmt: skip
    """Harvest FAST, BT(F) and BT(P) activations once each, train every SAE from them with identical
    settings, evaluate them on the same held-out conversations, and write results.{json,md,png} and
    frontier.png. Finished runs are reused, unfinished ones resumed."""
    from train.experiment import ReproduceConfig, reproduce

    defaults = ReproduceConfig.__dataclass_fields__
    try:
        cfg = ReproduceConfig(
            out=out_dir or default_out(),
            model=model_ref,
            layer=layer,
            tokens=tokens,
            chat_data=list(data) or defaults["chat_data"].default_factory(),
            pretrain_data=list(pretrain_data) or defaults["pretrain_data"].default_factory(),
            methods=tuple(methods) or defaults["methods"].default,
            archs=tuple(archs) or defaults["archs"].default,
            expansion=expansion,
            preset=preset,
            batch_size=batch_size,
            l1_coefficient=l1_coefficient,
            l0_coefficient=l0_coefficient,
            l1_grid=_numbers(l1_grid, "--l1-grid") if l1_grid else (),
            l0_grid=_numbers(l0_grid, "--l0-grid") if l0_grid else (),
            threshold_grid=_numbers(threshold_grid, "--threshold-grid") if threshold_grid else (),
            variants=tuple(variants) or defaults["variants"].default,
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
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
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
@click.option("--strengths", default="0,15,25,50,100,150,200", show_default=True,
              help="Comma-separated strengths, in %% of the median special-token residual norm.")  # fmt: skip
@click.option("--feature", type=int, help="Steer this feature instead of the top <|im_start|> feature.")
@click.option("--subjects", help="Comma-separated MMLU subjects (local data).  [default: high_school_geography,"
              "high_school_psychology,marketing,us_foreign_policy]")  # fmt: skip
@click.option(
    "--mmlu-limit", type=int, default=25, show_default=True, help="MMLU items per subject (0 = all)."
)
@click.option(
    "--max-new-tokens", type=int, default=48, show_default=True, help="Length of the greedy replies."
)
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with mmlu_{test,val,dev}.jsonl.  [default: ../shared/data/eval]")  # fmt: skip
@_steering_run_options
def sweep_command(out_dir, sae_dir, model_ref, strengths, feature, subjects, mmlu_limit, max_new_tokens,
                  n_conversations, data, eval_data, model_dtype, device, quiet) -> None:  # fmt: skip
    """Add the top <|im_start|> feature of the FAST SAE at special positions at several strengths: greedy
    replies to fixed prompts and a local MMLU score per strength (sweep.{json,md,png})."""
    from apps.evaluation.primitives import DEFAULT_EVAL_DATA
    from apps.evaluation.sweep import MMLU_SUBJECTS, SweepConfig, run_sweep
    from hub import load_model

    out = out_dir or default_out()
    try:
        settings = _settings(out)
        sae_dir = sae_dir or _steering_sae(out, "fast", "--sae")
        conversations = _conversations(out, list(data) or settings.get("chat_data"), n_conversations)
        cfg = SweepConfig(
            sae_dir=sae_dir,
            out=out / "sweep",
            strengths=_numbers(strengths),
            max_new_tokens=max_new_tokens,
            mmlu_subjects=tuple(s.strip() for s in subjects.split(",") if s.strip())
            if subjects
            else MMLU_SUBJECTS,
            mmlu_limit=mmlu_limit or None,
            eval_data=eval_data or DEFAULT_EVAL_DATA,
            feature=feature,
        )
        ref = model_ref or settings.get("model", "default")
        model, tok = load_model(ref, dtype=model_dtype, device=device)
        result = run_sweep(cfg, model, tok, conversations, model_ref=ref, progress=not quiet)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
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
@click.option("--strengths", default="15,25,50,100,150,200", show_default=True,
              help="Comma-separated positive strengths, in %% of the median special-token residual norm.")  # fmt: skip
@click.option(
    "--dev", "n_dev", type=int, default=100, show_default=True, help="IFEval dev prompts (strength choice)."
)
@click.option(
    "--test", "n_test", type=int, default=200, show_default=True, help="IFEval test prompts (reported)."
)
@click.option("--arc", "n_arc", type=int, default=200, show_default=True, help="ARC-Easy test items.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="IFEval reply length limit.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Split, random-direction and bootstrap seed."
)
@click.option("--resamples", type=int, default=2000, show_default=True, help="Bootstrap resamples.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with ifeval_input_data.jsonl and arc_easy_*.jsonl.  [default: ../shared/data/eval]")  # fmt: skip
@_steering_run_options
def steer_eval_command(out_dir, fast_sae, btf_sae, model_ref, strengths, n_dev, n_test, n_arc, max_new_tokens, seed,
                       resamples, batch_size, n_conversations, data, eval_data, model_dtype, device, quiet) -> None:  # fmt: skip
    """Plain, prompt-only, FAST / BT(F) top <|im_start|> feature and a random direction: strength chosen on
    an IFEval dev split, IFEval and ARC-Easy reported on test with paired bootstrap CIs (steer_eval.{json,md,png}).
    Finished cells are reused."""
    from apps.evaluation.primitives import DEFAULT_EVAL_DATA
    from apps.evaluation.steer_eval import SteerEvalConfig, run_steer_eval
    from hub import load_model

    out = out_dir or default_out()
    try:
        settings = _settings(out)
        cfg = SteerEvalConfig(
            fast_sae=fast_sae or _steering_sae(out, "fast", "--fast-sae"),
            btf_sae=btf_sae or _steering_sae(out, "bt-f", "--btf-sae"),
            out=out / "steer_eval",
            strengths=_numbers(strengths),
            dev=n_dev,
            test=n_test,
            arc=n_arc,
            max_new_tokens=max_new_tokens,
            eval_data=eval_data or DEFAULT_EVAL_DATA,
            batch_size=batch_size,
            seed=seed,
            resamples=resamples,
        )
        conversations = _conversations(out, list(data) or settings.get("chat_data"), n_conversations)
        ref = model_ref or settings.get("model", "default")
        model, tok = load_model(ref, dtype=model_dtype, device=device)
        report = run_steer_eval(
            cfg, model, tok, conversations, model_ref=ref, progress=not quiet, command=command_line()
        )
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
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
def report_command(out_dir, doc, steer_dir, notes) -> None:
    """Write docs/results.md from the JSON files that `reproduce` and `steer-eval` wrote (copied beside it)."""
    from apps.evaluation.results_doc import write_doc

    out = out_dir or default_out()
    steer = steer_dir or out / "steer_eval"
    has_steer = (steer / "steer_eval.json").is_file()
    if steer_dir and not has_steer:
        raise click.BadParameter(f"{steer} holds no steer_eval.json: run `fast-steer experiment steer-eval` first",
                                 param_hint="--steer-eval")  # fmt: skip
    try:
        path = write_doc(out, steer if has_steer else None, doc, notes)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {path}", err=True)


def _settings(out: Path) -> dict:
    path = out / "experiment.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _steering_sae(out: Path, method: str, option: str) -> Path:
    """The SAE of `method` that `reproduce` trained into `out` for steering (`train.experiment.steering_sae`)."""
    from train.experiment import steering_sae

    folder = steering_sae(out, method)
    if folder is None:
        name = {"fast": "FAST", "bt-f": "BT(F)", "bt-p": "BT(P)"}[method]
        raise FileNotFoundError(
            f"no trained {name} SAE under {out / 'runs' / method}: run `fast-steer experiment reproduce --out {out}` "
            f"first, or pass {option} DIR"
        )
    return folder


def _conversations(out: Path, data: list[str] | None, n: int) -> list:
    from train.data import load_conversations
    from train.experiment import HELDOUT_FILE, SHARED_DATA

    path = out / HELDOUT_FILE
    if path.is_file():
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    else:
        items = list(load_conversations(data or [str(SHARED_DATA / "chat")], split="held_out").items)
    if not items:
        raise ValueError("no held-out conversations for feature discovery")
    return items[:n]


def command_line() -> str:
    """The command as the user ran it (recorded in the results files)."""
    return shlex.join(["fast-steer", *sys.argv[1:]])


def _numbers(text: str, option: str = "--strengths") -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
        if not values:
            raise ValueError
        return values
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated numbers like 0,15,25", param_hint=option
        ) from None


def register(group: click.Group) -> None:
    group.add_command(experiment_group)

"""`fast-steer interp`: what SAE features mean. `collect` gathers the activation examples every later step reads.

Each command of the group maps its options onto a config dataclass (defaults read from its fields) and calls
one capability in `train.interp` (or `apps.interp`); a new command is one more `@interp_group.command`.
"""

from __future__ import annotations

from pathlib import Path

import click

from apps.cli.options import config_device_option, config_model_option, config_option

COLLECT = "train.interp.collect:CollectConfig"
RUN = "apps.interp.run:InterpConfig"
JUDGE = "apps.interp.judge:JudgeConfig"
NEURONPEDIA = "apps.interp.neuronpedia.export:NeuronpediaConfig"


def judge_options(command):
    """--judge-url, --judge-model, --judge-concurrency and --judge-timeout (for `judge_config`)."""
    options = [
        click.option(
            "--judge-url", required=True, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000."
        ),
        click.option(
            "--judge-model", required=True, help="Model name sent to the judge (recorded in the results)."
        ),
        config_option(
            JUDGE, "concurrency", "--judge-concurrency", type=int, help="Judge requests in flight at most."
        ),
        config_option(
            JUDGE,
            "timeout_s",
            "--judge-timeout",
            type=float,
            help="Seconds one judge answer may take (a slow local judge needs more).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def judge_config(cache_dir: Path, seed: int, judge_url: str, judge_model: str, judge_concurrency: int,
                 judge_timeout: float):  # fmt: skip
    """The `JudgeConfig` of `judge_options`' values, answers cached under `cache_dir`."""
    from apps.interp.judge import JudgeConfig

    return JudgeConfig(url=judge_url, model=judge_model, cache_dir=cache_dir, concurrency=judge_concurrency,
                       timeout_s=judge_timeout, seed=seed)  # fmt: skip


@click.group("interp")
def interp_group() -> None:
    """Interpretability of SAE features: activation examples, judge scores and proxies."""


@interp_group.command("collect")
@click.argument("sae_dir")
@click.option(
    "--data", "data", required=True, multiple=True, help="Conversations: JSONL file(s), folder(s) or HF id."
)
@config_option(COLLECT, "split", "--split", help="held-out (never trained on) | all.")
@config_option(
    COLLECT, "instances", "--instances", type=int, help="Conversations to read (the paper's 10,000)."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of collections; this one goes to OUT/<hash of SAE, data and settings>/.",
)
@config_model_option(COLLECT)
@config_option(COLLECT, "dtype", "--dtype", help="Model dtype: float32 | bfloat16 | float16.")
@config_option(COLLECT, "max_len", "--max-len", type=int, help="Tokens per conversation (truncated beyond).")
@config_device_option(COLLECT)
def collect_command(
    sae_dir: str,
    data: tuple[str, ...],
    split: str,
    instances: int,
    out: Path,
    model_ref: str,
    dtype: str,
    max_len: int,
    device: str,
) -> None:
    """Collect the activation examples of the SAE in SAE_DIR (reused when already collected; resumes)."""
    from train.interp.collect import CollectConfig, collect_examples
    from train.interp.store import folder_bytes

    config = CollectConfig(
        instances=instances, split=split, model=model_ref, dtype=dtype, max_len=max_len, device=device
    )
    collection = collect_examples(sae_dir, list(data), out, config)
    manifest = collection.manifest
    stats, read = manifest["stats"], manifest["data"]
    speed = f", {stats['tokens_per_s']:,.0f} tokens/s" if stats["tokens_per_s"] else ""
    click.echo(f"collection: {collection.folder}")
    click.echo(
        f"{read['conversations']} conversations (of {read['instances_requested']} asked), {stats['tokens']:,} "
        f"tokens; {stats['live_features']} of {collection.d_sae} features fire, mean L0 {stats['mean_l0']:.1f}"
    )
    click.echo(f"{folder_bytes(collection.folder) / 2**20:.1f} MiB on disk; collected in "
               f"{stats['collect_seconds']:.1f} s{speed}")  # fmt: skip


@interp_group.command("run")
@click.argument("sae_dir")
@click.option(
    "--data", "data", required=True, multiple=True, help="Conversations: JSONL file(s), folder(s) or HF id."
)
@judge_options
@config_option(
    RUN, "protocol", "--protocol", help="fast-paper | detection | fuzzing | all, or a comma-separated list."
)
@config_option(RUN, "controls", "--controls", is_flag=True, help="Run the controls and give a judge verdict.")
@config_option(RUN, "features", "--features", type=int, help="Features sampled at random (seeded).")
@config_option(COLLECT, "instances", "--instances", type=int, help="Conversations to read.")
@config_option(COLLECT, "split", "--split", help="held-out (never trained on) | all.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of interp.json, explanations.json, the collections and the judge cache.",
)
@config_option(RUN, "seed", "--seed", type=int, help="Seeds the feature sample, test sets and controls.")
@config_option(
    RUN, "reason_first", "--reason-first", is_flag=True, help="Ablation: reasoning before the score."
)
@config_model_option(COLLECT)
@config_device_option(COLLECT)
def run_command(
    sae_dir: str,
    data: tuple[str, ...],
    judge_url: str,
    judge_model: str,
    protocol: str,
    controls: bool,
    features: int,
    instances: int,
    split: str,
    out: Path,
    seed: int,
    reason_first: bool,
    judge_concurrency: int,
    judge_timeout: float,
    model_ref: str,
    device: str,
) -> None:
    """Score the features of the SAE in SAE_DIR with a judge (key from $FAST_STEER_JUDGE_KEY or
    $OPENAI_API_KEY); writes OUT/interp.json and OUT/explanations.json."""
    from apps.interp.run import INTERP_FILE, InterpConfig, run_interp
    from train.interp.collect import CollectConfig

    judge = judge_config(out / "judge-cache", seed, judge_url, judge_model, judge_concurrency, judge_timeout)
    config = InterpConfig(
        sae=sae_dir,
        data=list(data),
        out=out,
        judge=judge,
        protocol=protocol,
        controls=controls,
        features=features,
        seed=seed,
        reason_first=reason_first,
        collect=CollectConfig(instances=instances, split=split, model=model_ref, device=device),
    )
    summary = run_interp(config)["summary"]
    click.echo(f"wrote {out / INTERP_FILE}")
    if summary["fast_paper"]:
        share = summary["fast_paper"]["share_4_5"]
        if share["value"] is not None:
            click.echo(
                f"fast-paper share 4-5: {share['value']:.3f} [{share['ci_low']:.3f}, {share['ci_high']:.3f}]"
            )
    for scorer in ("detection", "fuzzing"):
        if summary[scorer] and summary[scorer]["balanced_accuracy_median"] is not None:
            click.echo(
                f"{scorer} median balanced accuracy: {summary[scorer]['balanced_accuracy_median']:.3f}"
            )
    click.echo(f"{summary['n_scored']} answers scored, {summary['n_parse_failures']} unparseable")
    if summary["controls"]:
        click.echo(summary["controls"]["verdict"])


@interp_group.command("label")
@click.argument("sae_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--from",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The --out folder of `fast-steer interp run` whose labels to store.",
)
def label_command(sae_dir: Path, run_dir: Path) -> None:
    """Store the labels, scores and judge of a run in SAE_DIR/explanations.json, beside cfg.json. Other
    judges' labellings are kept; the best-scored one is the default that every consumer shows."""
    from hub.labels import LABELS_FILE, labellings_from_run, store_labellings
    from hub.sae_io import resolve_sae_folder
    from steer.errors import ConfigError, MissingFileError
    from train.interp.identity import sae_identity

    if not sae_dir.is_dir():
        raise MissingFileError(
            f"SAE folder {sae_dir} does not exist (labels are stored in a local SAE folder)"
        )
    folder = resolve_sae_folder(sae_dir)
    labellings = labellings_from_run(run_dir, sae_identity(folder)["weights_sha256"])
    if not labellings:
        raise ConfigError(f"{run_dir} holds no labels (were all the judge's answers unparseable?)")
    labels, notes = store_labellings(folder, labellings)
    for note in notes:
        click.echo(f"note: {note}")
    for labelling in labellings:
        click.echo(f"stored {labelling.describe()}")
    click.echo(f"default labelling: {labels.default.describe()}")
    click.echo(f"wrote {folder / LABELS_FILE}")


def _from_option(command):
    return click.option(
        "--from",
        "run_dir",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="The --out folder of `fast-steer interp run` (its interp.json and collection).",
    )(command)


def _out_option(help_text: str):
    """The required output folder of a command that writes a set of files."""
    return click.option(
        "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help=help_text
    )


def _features_option(command):
    return click.option(
        "--features",
        "features",
        default=None,
        help="Only these features, e.g. 3,17,40-45 (default: every feature that fired).",
    )(command)


@interp_group.command("dashboard")
@click.argument("sae_dir")
@_from_option
@_out_option("Folder of the static site.")
@_features_option
def dashboard_command(sae_dir: str, run_dir: Path, out: Path, features: str | None) -> None:
    """Write an offline feature dashboard of the SAE in SAE_DIR: OUT/index.html (a searchable, sortable table)
    and one card per feature, working from file:// with no network."""
    from apps.interp.dashboard import DashboardConfig, build_dashboard
    from apps.interp.results import parse_feature_list

    chosen = None if features is None else parse_feature_list(features)
    info = build_dashboard(DashboardConfig(sae=sae_dir, run_dir=run_dir, out=out, features=chosen))
    click.echo(f"{info['features']} feature cards ({info['scored']} scored by the judge)")
    click.echo(f"wrote {out / 'index.html'}")


@interp_group.command("export-neuronpedia")
@click.argument("sae_dir")
@_from_option
@_out_option("Exports folder; the files go to OUT/<modelId>/<sourceId>/.")
@config_option(
    NEURONPEDIA, "model_id", "--model-id", help="Neuronpedia model id (default: from the SAE's model)."
)
@config_option(NEURONPEDIA, "source_set", "--source-set", help="Source set name (the source is LAYER-NAME).")
@config_option(NEURONPEDIA, "creator", "--creator", help="creatorId / creatorName of the records.")
@_features_option
def export_neuronpedia_command(
    sae_dir: str,
    run_dir: Path,
    out: Path,
    model_id: str | None,
    source_set: str | None,
    creator: str,
    features: str | None,
) -> None:
    """Export the SAE in SAE_DIR for Neuronpedia's bulk import: features, activations and explanations in
    JSONL batches, each record validated against the schema. No network call."""
    from apps.interp.neuronpedia import NeuronpediaConfig, export_neuronpedia
    from apps.interp.results import parse_feature_list

    config = NeuronpediaConfig(
        sae=sae_dir,
        run_dir=run_dir,
        out=out,
        model_id=model_id,
        source_set=source_set,
        creator=creator,
        features=None if features is None else parse_feature_list(features),
    )
    click.echo(f"wrote {export_neuronpedia(config)}")


def register(group: click.Group) -> None:
    group.add_command(interp_group)

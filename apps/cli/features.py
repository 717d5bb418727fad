"""`fast-steer features`: which SAE features fire on the chat template's special tokens.

Prints the top features per special/role token type (FAST paper, App. F) and writes them as JSON;
with `--feature K`, prints the contexts where feature K is strongest, the token highlighted; with
`--search TEXT`, the features whose labels (the SAE's explanations.json) match TEXT. Labels, when the SAE
has them, are shown beside the feature ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from apps.cli.options import device_map_options, device_option, model_option

if TYPE_CHECKING:
    from hub import DeviceMap


@click.command("features")
@click.argument("sae_dir")
@click.option(
    "--data",
    "data",
    multiple=True,
    help="Conversations: JSONL file(s), folder(s) or HF id (not with --search).",
)
@model_option
@click.option("--sae-id", default=None, help="Sub-folder of SAE_DIR (or of a Hub repo) holding the SAE.")
@click.option(
    "--layer", type=int, default=None, help="Layer the SAE reads [default: from the SAE's metadata]."
)
@click.option(
    "--n", "n_conversations", type=int, default=200, show_default=True, help="Conversations to read."
)
@click.option(
    "--top",
    "top_k",
    type=int,
    default=10,
    show_default=True,
    help="Features per token type (or search results).",
)
@click.option(
    "--search", "query", default=None, help='Find features by label, e.g. "polite tone" (no model run).'
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report here."
)
@click.option(
    "--feature", type=int, default=None, help="Print the top-activating contexts of this feature instead."
)
@click.option(
    "--contexts", "n_contexts", type=int, default=10, show_default=True, help="Contexts with --feature."
)
@click.option("--window", type=int, default=12, show_default=True, help="Tokens on each side of the context.")
@click.option("--include-first-token", is_flag=True, help="Also use position 0 (an attention-sink outlier).")
@click.option(
    "--dtype", default="float32", show_default=True, help="Model dtype: float32 | bfloat16 | float16."
)
@device_option
@device_map_options
@click.option(
    "--color/--no-color", default=None, help="Highlight with ANSI colour [default: when a terminal]."
)
def features_command(
    sae_dir: str,
    data: tuple[str, ...],
    model_ref: str,
    sae_id: str | None,
    layer: int | None,
    n_conversations: int,
    top_k: int,
    json_path: Path | None,
    feature: int | None,
    n_contexts: int,
    window: int,
    include_first_token: bool,
    dtype: str,
    device: str,
    device_map: DeviceMap | None,
    color: bool | None,
    query: str | None,
) -> None:
    """Top SAE features per special token of SAE_DIR's model, the contexts of one feature, or a search of the
    features' labels."""
    from hub import load_model
    from hub.registry import feature_url
    from hub.sae_io import load_sae, sae_layer
    from steer.hooks import layer_device
    from train.data import load_conversations
    from train.features import discover_features, top_contexts

    if query is not None:
        _print_search(sae_dir, sae_id, query, top_k)
        return
    if not data:
        raise click.UsageError("give --data (conversations to read), or --search TEXT to search the labels")
    if n_conversations < 1:
        raise click.BadParameter("must be positive", param_hint="--n")
    model, tokenizer = load_model(model_ref, dtype=dtype, device=device, device_map=device_map)
    sae = load_sae(sae_dir, sae_id, device=device, expected_d_in=model.config.get_text_config().hidden_size)
    layer = layer if layer is not None else sae_layer(sae)
    if layer is None:
        raise click.UsageError("the SAE's metadata names no residual-stream layer; pass --layer L")
    sae = sae.to(layer_device(model, layer))  # where the layer's residuals are (a device map spreads layers)
    corpus = load_conversations(list(data), limit=n_conversations)
    if len(corpus) == 0:
        raise click.ClickException(f"no conversations read from {', '.join(data)}")
    common = dict(skip_first=not include_first_token)
    if feature is not None:
        contexts = top_contexts(
            feature, model, tokenizer, sae, layer, corpus.items, k=n_contexts, window=window, **common
        )
    else:
        report = discover_features(model, tokenizer, sae, layer, corpus.items, top_k=top_k, **common)

    if feature is not None:
        style = (
            "ansi"
            if (color if color is not None else click.get_text_stream("stdout").isatty())
            else "brackets"
        )
        named = f" {_quoted(sae.labels, feature)}" if sae.labels is not None else ""
        click.echo(
            f"feature {feature}{named} at layer {layer}: top {len(contexts)} of {len(corpus)} conversations"
        )
        if url := feature_url(sae.metadata, feature):
            click.echo(f"Neuronpedia: {url}")
        for ctx in contexts:
            where = f"conv {ctx.conversation} pos {ctx.position}" + (f" ({ctx.label})" if ctx.label else "")
            click.echo(f"{ctx.activation:9.3f}  {where}: {ctx.render(style)}", color=style == "ansi")
        if not contexts:
            click.echo("the feature never fires on these conversations")
        return

    click.echo(f"layer {layer}, {report.n_conversations} conversations: mean per-conversation max activation")
    for entry in report.token_types:
        click.echo(f"\n{entry.token!r} (in {entry.n_conversations} conversations)")
        for rank, stat in enumerate(entry.top, 1):
            named = f"  {_quoted(sae.labels, stat.feature)}" if sae.labels is not None else ""
            url = feature_url(sae.metadata, stat.feature)
            click.echo(
                f"  {rank:2d}. feature {stat.feature:6d}  {stat.mean_max_activation:9.3f}  fires in "
                f"{stat.fire_rate:.0%}{named}" + (f"  {url}" if url else "")
            )
        if not entry.top:
            click.echo("  no feature fires")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(report.to_json(), encoding="utf-8")
        click.echo(f"\nwrote {json_path}")


def _quoted(labels, feature: int) -> str:
    """A feature's label in quotes, or `(unlabelled)`."""
    label = labels.get(feature)
    return "(unlabelled)" if label is None else f"{label!r}"


def _print_search(sae_dir: str, sae_id: str | None, query: str, limit: int) -> None:
    """The features of the SAE's default labelling that match `query`, with the match score beside each."""
    from hub.labels import LABELS_FILE, read_labels
    from hub.sae_io import resolve_sae_folder
    from steer.errors import MissingFileError

    if limit < 1:
        raise click.BadParameter("must be positive", param_hint="--top")
    folder = resolve_sae_folder(sae_dir, sae_id)
    found = read_labels(folder)
    if found is None or found.default is None:
        raise MissingFileError(
            f"the SAE in {folder} has no labels ({LABELS_FILE}); store a run's with "
            "`fast-steer interp label SAE --from RUN_DIR`"
        )
    labelling = found.default
    hits = labelling.search(query, limit)
    click.echo(f"labels: {labelling.describe()}")
    if not hits:
        click.echo(f"no feature label matches {query!r}")
        return
    click.echo(f"{'match':>7}  {'feature':>7}  {'score':>6}  {'density':>8}  label")
    for hit in hits:
        score = "-" if hit.score is None else f"{hit.score:.3g}"
        density = "-" if hit.density is None else f"{hit.density:.2e}"
        click.echo(f"{hit.match:7.3f}  {hit.feature:7d}  {score:>6}  {density:>8}  {hit.label}")


def register(group: click.Group) -> None:
    group.add_command(features_command)

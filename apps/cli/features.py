"""`fast-steer features`: which SAE features fire on the chat template's special tokens.

Prints the top features per special/role token type (FAST paper, App. F) and writes them as JSON;
with `--feature K`, prints the contexts where feature K is strongest, the token highlighted.
"""

from __future__ import annotations

from pathlib import Path

import click

from apps.cli.options import device_option, model_option


@click.command("features")
@click.argument("sae_dir")
@click.option(
    "--data", "data", required=True, multiple=True, help="Conversations: JSONL file(s), folder(s) or HF id."
)
@model_option
@click.option("--sae-id", default=None, help="Sub-folder of SAE_DIR (or of a Hub repo) holding the SAE.")
@click.option(
    "--layer", type=int, default=None, help="Layer the SAE reads [default: from the SAE's metadata]."
)
@click.option(
    "--n", "n_conversations", type=int, default=200, show_default=True, help="Conversations to read."
)
@click.option("--top", "top_k", type=int, default=10, show_default=True, help="Features per token type.")
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
    color: bool | None,
) -> None:
    """Top SAE features per special token of SAE_DIR's model, or the contexts of one feature."""
    from hub import ModelResolutionError, load_model
    from hub.sae_io import load_sae, sae_layer
    from train.data import load_conversations
    from train.features import discover_features, top_contexts

    if n_conversations < 1:
        raise click.BadParameter("must be positive", param_hint="--n")
    try:
        model, tokenizer = load_model(model_ref, dtype=dtype, device=device)
        sae = load_sae(
            sae_dir, sae_id, device=device, expected_d_in=model.config.get_text_config().hidden_size
        )
        layer = layer if layer is not None else sae_layer(sae)
        if layer is None:
            raise click.UsageError("the SAE's metadata names no residual-stream layer; pass --layer L")
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
    except (ModelResolutionError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc

    if feature is not None:
        style = (
            "ansi"
            if (color if color is not None else click.get_text_stream("stdout").isatty())
            else "brackets"
        )
        click.echo(f"feature {feature} at layer {layer}: top {len(contexts)} of {len(corpus)} conversations")
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
            click.echo(
                f"  {rank:2d}. feature {stat.feature:6d}  {stat.mean_max_activation:9.3f}  fires in {stat.fire_rate:.0%}"
            )
        if not entry.top:
            click.echo("  no feature fires")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(report.to_json(), encoding="utf-8")
        click.echo(f"\nwrote {json_path}")


def register(group: click.Group) -> None:
    group.add_command(features_command)

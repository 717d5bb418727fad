"""`fast-steer eval`: held-out metrics of trained SAE folders."""

from __future__ import annotations

from pathlib import Path

import click

from apps.cli.options import config_option, device_option

EVAL = "train.evaluate:EvalConfig"


@click.command("eval")
@click.argument("sae_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    multiple=True,
    type=click.Path(),
    required=True,
    help="Conversation files/folders (see --split).",
)
@click.option(
    "--split",
    type=click.Choice(["held-out", "all"]),
    default="held-out",
    show_default=True,
    help="held-out: the content-hash split the training left out (fraction from the SAE's metadata); "
    "all: every conversation in --data (a dedicated evaluation set).",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Results JSON [default: SAE_DIR/eval.json]."
)
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write PNGs here.")
@click.option("--model", "model_ref", help="Model reference [default: the SAE's metadata.model_name].")
@click.option("--dtype", "model_dtype", help="Model dtype [default: the dtype the SAE was trained on].")
@device_option
@config_option(EVAL, "max_conversations", "--max-conversations", type=int)
@config_option(EVAL, "max_len", "--max-len", type=int, help="Truncation per conversation.")
@click.option(
    "--special-token",
    "extra_special",
    multiple=True,
    help="Extra token (string or id) counted as special for MSE_st, e.g. 'Ċ'.",
)
@click.option(
    "--no-lm-loss", is_flag=True, help="Skip the delta LM loss (the forward then stops after layer L)."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(sae_dir, data, split, json_path, plot_dir, model_ref, model_dtype, device, max_conversations,
                 max_len, extra_special, no_lm_loss, quiet) -> None:  # fmt: skip
    """Evaluate the SAE(s) in SAE_DIR on conversations (the held-out split by default): MSE, MSE_st, L0,
    explained variance, dead/dense shares and delta LM loss. A sweep folder evaluates each SAE in it."""
    from hub import list_sae_ids
    from hub.formats import CFG_FILE
    from train.eval_run import evaluate_folder
    from train.evaluate import EvalConfig, format_table
    from train.plots import plot_mse_by_token_type, plot_training
    from train.trainer import LOG_FILE

    root = Path(sae_dir)
    folders = [root] if (root / CFG_FILE).is_file() else [root / i for i in list_sae_ids(root)]
    if not folders:
        raise click.ClickException(f"{root} holds no SAE (no {CFG_FILE} in it or its sub-folders)")
    if json_path and len(folders) > 1:
        raise click.ClickException(f"{root} holds {len(folders)} SAEs; --json needs a single SAE folder")
    extra = tuple(int(t) if t.isdigit() else t for t in extra_special)
    cfg = EvalConfig(max_conversations=max_conversations, max_len=max_len, extra_special_tokens=extra,
                     lm_loss=not no_lm_loss)  # fmt: skip
    loaded = None
    for folder in folders:
        if loaded is None and model_ref:
            from hub import load_model

            loaded = load_model(model_ref, dtype=model_dtype or "float32", device=device)
        result, path = evaluate_folder(folder, list(data), split=split, loaded=loaded, model_dtype=model_dtype,
                                       device=device, cfg=cfg, json_path=json_path,
                                       progress=not quiet)  # fmt: skip
        if len(folders) > 1:
            click.echo(f"== {folder}")
        click.echo(format_table(result))
        click.echo(f"results: {path}")
        if plot_dir:
            target = Path(plot_dir) / folder.name if len(folders) > 1 else Path(plot_dir)
            pngs = [plot_mse_by_token_type(result, target)]
            log_file = next((p / LOG_FILE for p in (folder, folder.parent) if (p / LOG_FILE).is_file()), None)
            if log_file is not None:
                pngs.append(plot_training(log_file, target))
            click.echo("plots: " + ", ".join(map(str, pngs)))


def register(group: click.Group) -> None:
    group.add_command(eval_command)

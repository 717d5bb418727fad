"""`fast-steer train` (one or a sweep of SAEs on one activation stream) and `fast-steer eval`."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import click

from apps.cli_options import model_option

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}


def parse_tokens(text: str) -> int:
    """`40960000`, `40.96M`, `200k` -> int."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGbB]?)\s*", str(text))
    if not match:
        raise click.BadParameter(f"{text!r} is not a token count (e.g. 500000, 200k, 40.96M)")
    return int(round(float(match.group(1)) * _SUFFIX[match.group(2).lower()]))


class _Tokens(click.ParamType):
    name = "TOKENS"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_tokens(value)


def sweep_specs(archs, expansions, coefficients, ks, bandwidth, init_threshold):
    """The SAE specs of a sweep: arch x expansion x (coefficient, or k for topk)."""
    from train.config import SAETrainSpec

    specs = []
    for arch, expansion in itertools.product(archs, expansions):
        if arch == "topk":
            if not ks:
                raise click.UsageError("--arch topk needs --k (one or more values)")
            specs += [SAETrainSpec(arch="topk", expansion=expansion, k=k) for k in ks]
        else:
            specs += [
                SAETrainSpec(
                    arch=arch,
                    expansion=expansion,
                    sparsity_coefficient=c,
                    jumprelu_bandwidth=bandwidth,
                    jumprelu_init_threshold=init_threshold,
                )
                for c in (coefficients or [None])
            ]
    return specs


def _dist_context():
    from train.distributed import DistContext

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate / torchrun
        return DistContext.from_accelerate()
    return DistContext.current()


@click.command("train")
@model_option
@click.option("--data", multiple=True, type=click.Path(), help="Conversation files/folders (repeatable).")
@click.option(
    "--pretrain-data", multiple=True, type=click.Path(), help="Pretraining text files/folders (bt-p)."
)
@click.option("--layer", type=int, required=True, help="Residual stream after decoder block L (0-indexed).")
@click.option("--method", type=click.Choice(["fast", "bt-f", "bt-p"]), default="fast", show_default=True)
@click.option(
    "--arch",
    "archs",
    multiple=True,
    type=click.Choice(["standard", "jumprelu", "topk"]),
    help="SAE architecture(s); several values sweep SAEs on one stream.  [default: standard]",
)
@click.option(
    "--expansion", "expansions", multiple=True, type=int, help="d_sae / d_in (repeatable).  [default: 8]"
)
@click.option(
    "--l1",
    "coefficients",
    multiple=True,
    type=float,
    help="Sparsity coefficient(s): L1 for standard, L0 for jumprelu.  [default: the preset's]",
)
@click.option("--k", "ks", multiple=True, type=int, help="k of topk SAEs (repeatable).")
@click.option("--tokens", type=_Tokens(), help="Training tokens (e.g. 2M).  [default: the preset's]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output folder.")
@click.option(
    "--preset",
    type=click.Choice(["default", "paper"]),
    default="default",
    show_default=True,
    help="paper: App. C of arXiv 2506.07691; default: a useful SAE on a CPU in minutes.",
)
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint in --out.")
@click.option("--batch-size", type=int, help="Tokens per optimiser step.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--lr-end", type=float, help="Learning-rate floor of the cosine decay.")
@click.option("--seed", type=int, help="Seed of the SAE initialisation.")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints (0: none).")
@click.option("--log-every", type=int, help="Steps between JSONL log lines.")
@click.option("--autocast/--no-autocast", default=None, help="bf16 autocast for the SAE step.")
@click.option(
    "--jumprelu-bandwidth", type=float, help="STE bandwidth.  [default: the preset's: 0.1, paper 0.001]"
)
@click.option(
    "--jumprelu-init-threshold",
    type=float,
    help="Initial threshold.  [default: the preset's: 0.5, paper 0.001]",
)
@click.option(
    "--dtype",
    "model_dtype",
    default="auto",
    show_default=True,
    help="Model dtype for harvesting (auto: bfloat16 on CUDA / AMX CPUs, else float32).",
)
@click.option("--buffer-tokens", type=int, default=65536, show_default=True, help="Mixing buffer size.")
@click.option("--token-budget", type=int, default=8192, show_default=True, help="Padded tokens per forward.")
@click.option(
    "--max-len", type=int, help="FAST truncation per conversation.  [default: 8192 or the model's context]"
)
@click.option("--block-len", type=int, default=2048, show_default=True, help="BT block length.")
@click.option("--exclude-first-token", is_flag=True, help="Drop position 0 (its norm is ~100x on SmolLM2).")
@click.option(
    "--max-norm-multiple", type=float, help="Drop activations above this multiple of the median norm."
)
@click.option("--held-out-fraction", type=float, default=0.05, show_default=True)
@click.option(
    "--data-seed", type=int, default=0, show_default=True, help="Seed of the data order and buffer."
)
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write training-curve PNGs here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(model_ref, data, pretrain_data, layer, method, archs, expansions, coefficients, ks, tokens,
                  out_dir, preset, resume, batch_size, lr, lr_end, seed, checkpoint_every, log_every, autocast,
                  jumprelu_bandwidth, jumprelu_init_threshold, model_dtype, buffer_tokens, token_budget, max_len,
                  block_len, exclude_first_token, max_norm_multiple, held_out_fraction, data_seed, plot_dir,
                  quiet) -> None:  # fmt: skip
    """Train SAEs on the residual stream of a chat model (FAST by default) and write SAELens folders."""
    from train.config import preset_config
    from train.plots import plot_training
    from train.run import DataSpec, train_run
    from train.trainer import LOG_FILE

    try:
        specs = sweep_specs(archs or ("standard",), expansions or (8,), coefficients, ks,
                            jumprelu_bandwidth, jumprelu_init_threshold)  # fmt: skip
        cfg = preset_config(
            preset,
            saes=specs,
            total_tokens=tokens,
            batch_size=batch_size,
            lr=lr,
            lr_end=lr_end,
            seed=seed,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            autocast=autocast,
        )
        spec = DataSpec(
            layer=layer,
            data=list(data),
            pretrain_data=list(pretrain_data),
            method=method,
            model=model_ref,
            model_dtype=model_dtype,
            held_out_fraction=held_out_fraction,
            buffer_tokens=buffer_tokens,
            token_budget=token_budget,
            max_len=max_len,
            block_len=block_len,
            exclude_first_token=exclude_first_token,
            max_norm_multiple=max_norm_multiple,
            seed=data_seed,
        )
        dist = _dist_context()
        result = train_run(cfg, spec, out_dir, resume=resume, progress=not quiet, dist=dist)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not dist.is_main:
        return
    if plot_dir:
        plot_training(Path(out_dir) / LOG_FILE, plot_dir)
    click.echo(json.dumps({
        "sae_dirs": [str(p) for p in result.sae_dirs],
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "peak_memory_mib": round(result.peak_memory_mib, 1),
        "resumed_from_step": result.resumed_from_step,
        "final_metrics": result.final_metrics,
    }, indent=2))  # fmt: skip


@click.command("eval")
@click.argument("sae_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    multiple=True,
    type=click.Path(),
    required=True,
    help="Conversation files/folders; their held-out split (content hash) is used.",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Results JSON [default: SAE_DIR/eval.json]."
)
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write PNGs here.")
@click.option("--model", "model_ref", help="Model reference [default: the SAE's metadata.model_name].")
@click.option("--dtype", "model_dtype", help="Model dtype [default: the dtype the SAE was trained on].")
@click.option("--max-conversations", type=int, default=200, show_default=True)
@click.option("--max-len", type=int, default=2048, show_default=True, help="Truncation per conversation.")
@click.option(
    "--special-token",
    "extra_special",
    multiple=True,
    help="Extra token (string or id) counted as special for MSE_st, e.g. 'Ċ'.",
)
@click.option("--no-lm-loss", is_flag=True, help="Skip the delta LM loss (two full forwards per batch).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(sae_dir, data, json_path, plot_dir, model_ref, model_dtype, max_conversations, max_len,
                 extra_special, no_lm_loss, quiet) -> None:  # fmt: skip
    """Evaluate the SAE(s) in SAE_DIR on held-out conversations: MSE, MSE_st, L0, explained variance,
    dead/dense shares and delta LM loss. A sweep folder evaluates each SAE in it."""
    from hub import list_sae_ids
    from train.evaluate import EvalConfig, format_table
    from train.plots import plot_mse_by_token_type, plot_training
    from train.run import evaluate_folder
    from train.trainer import LOG_FILE

    root = Path(sae_dir)
    folders = [root] if (root / "cfg.json").is_file() else [root / i for i in list_sae_ids(root)]
    if not folders:
        raise click.ClickException(f"{root} holds no SAE (no cfg.json in it or its sub-folders)")
    if json_path and len(folders) > 1:
        raise click.ClickException(f"{root} holds {len(folders)} SAEs; --json needs a single SAE folder")
    extra = tuple(int(t) if t.isdigit() else t for t in extra_special)
    cfg = EvalConfig(max_conversations=max_conversations, max_len=max_len, extra_special_tokens=extra,
                     lm_loss=not no_lm_loss)  # fmt: skip
    loaded = None
    for folder in folders:
        try:
            if loaded is None and model_ref:
                from hub import load_model

                loaded = load_model(model_ref, dtype=model_dtype or "float32")
            result, path = evaluate_folder(folder, list(data), loaded=loaded, model_dtype=model_dtype, cfg=cfg,
                                           json_path=json_path, progress=not quiet)  # fmt: skip
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc
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
    group.add_command(train_command)
    group.add_command(eval_command)

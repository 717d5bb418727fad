"""`fast-steer train` (one or a sweep of SAEs on one activation stream) and `fast-steer harvest` (write
activations to disk once, train from them many times). Both map their options onto one `RunConfig`
(`run_config_from_options`)."""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from pathlib import Path

import click

from apps.cli.options import (
    config_device_option,
    config_model_option,
    config_option,
    device_map_options,
    stack,
)
from steer.sae import architectures
from train.sequences import METHODS

RUN = "train.run_config:RunConfig"
DATA = "train.run_config:DataConfig"
STREAM = "train.run_config:StreamSettings"
TRAIN = "train.config:TrainConfig"
SPEC = "train.config:SAETrainSpec"
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


def sweep_specs(archs, expansions, l1_coefficients, l0_coefficients, ks, bandwidth, init_threshold):
    """The SAE specs of a sweep: arch x expansion x (its coefficient: --l1 for L1 architectures, --l0 for L0
    ones, the preset's when not given; or --k for k ones)."""
    from steer.sae import sae_class
    from train.config import SAETrainSpec

    values = {"l1": l1_coefficients, "l0": l0_coefficients, "k": ks}
    used = {sae_class(arch).sparsity for arch in archs}
    for sparsity, given in values.items():
        if given and sparsity not in used:
            takes = " / ".join(a for a in architectures() if sae_class(a).sparsity == sparsity)
            trains = ", ".join(f"{a} (--{sae_class(a).sparsity})" for a in dict.fromkeys(archs))
            raise click.UsageError(f"--{sparsity} applies to {takes} SAEs; this run trains {trains}")
    specs = []
    for arch, expansion in itertools.product(archs, expansions):
        sparsity = sae_class(arch).sparsity
        if sparsity == "k":
            if not ks:
                raise click.UsageError(f"--arch {arch} needs --k (one or more values)")
            specs += [SAETrainSpec(arch=arch, expansion=expansion, k=k) for k in ks]
        else:
            specs += [
                SAETrainSpec(
                    arch=arch,
                    expansion=expansion,
                    sparsity_coefficient=c,
                    jumprelu_bandwidth=bandwidth,
                    jumprelu_init_threshold=init_threshold,
                )
                for c in (values[sparsity] or [None])
            ]
    return specs


def _dist_context(device: str):
    from train.distributed import DistContext

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate / torchrun
        return DistContext.from_accelerate(cpu=device == "cpu")
    return DistContext.current(device)


def stream_options(fn):
    """The model, data and stream options shared by `train` and `harvest`."""
    options = [
        config_model_option(RUN),
        config_device_option(RUN),
        device_map_options,
        click.option("--data", multiple=True, type=click.Path(), help="Conversation files/folders (repeatable)."),
        click.option("--pretrain-data", multiple=True, type=click.Path(), help="Pretraining text files/folders (bt-p)."),
        click.option("--layer", type=int, help="Residual stream after decoder block L (0-indexed)."),
        config_option(DATA, "method", "--method", type=click.Choice(METHODS)),
        config_option(RUN, "model_dtype", "--dtype", "model_dtype",
                      help="Model dtype for harvesting (auto: bfloat16 on CUDA / AMX CPUs, else float32)."),
        config_option(RUN, "compile", "--compile/--no-compile",
                      help="torch.compile the harvesting forward's layers: a one-off compile (seconds; needs a C++ "
                           "compiler on a CPU, Triton on a GPU), then a faster forward.  [default: on a CPU with a "
                           "C++ compiler, for 64k tokens or more]"),
        config_option(STREAM, "buffer_tokens", "--buffer-tokens", type=int, help="Mixing buffer size."),
        config_option(STREAM, "token_budget", "--token-budget", type=int, help="Padded tokens per forward."),
        config_option(STREAM, "width_multiple", "--width-multiple", type=int,
                      help="Harvesting batch widths rounded up to a multiple of this (fewer distinct shapes)."),
        config_option(STREAM, "max_len", "--max-len", type=int,
                      help="FAST truncation per conversation.  [default: 8192 or the model's context]"),
        config_option(STREAM, "block_len", "--block-len", type=int, help="BT block length."),
        click.option("--exclude-first-token", is_flag=True, help="Drop position 0 (its norm is ~100x on SmolLM2)."),
        config_option(STREAM, "max_norm_multiple", "--max-norm-multiple", type=float,
                      help="Drop activations above this multiple of the median norm."),
        config_option(DATA, "held_out_fraction", "--held-out-fraction", type=float),
        config_option(DATA, "seed", "--data-seed", type=int, help="Seed of the data order and buffer."),
    ]  # fmt: skip
    return stack(*options)(fn)


def run_config_from_options(opts: dict, training, activations: str | None = None):
    """The `RunConfig` of a command's options (the one place where options become settings)."""
    from train.run_config import DataConfig, RunConfig, StreamSettings

    layer = opts["layer"]
    if activations is not None:
        from train.activation_cache import read_manifest

        harvested = read_manifest(activations)["run"]
        layer = harvested["layer"] if layer is None else layer
        opts = {**opts, "model_ref": harvested["model"], "method": harvested["data"]["method"]}
    if layer is None:
        raise click.UsageError("--layer is required (or --activations DIR, which knows its layer)")
    return RunConfig(
        layer=layer,
        training=training,
        model=opts["model_ref"],
        device=opts["device"],
        device_map=opts["device_map"],
        model_dtype=opts["model_dtype"],
        compile=opts["compile"],
        data=DataConfig(
            method=opts["method"],
            chat=list(opts["data"]),
            pretrain=list(opts["pretrain_data"]),
            held_out_fraction=opts["held_out_fraction"],
            seed=opts["data_seed"],
            activations=activations,
        ),
        stream=StreamSettings(
            buffer_tokens=opts["buffer_tokens"],
            token_budget=opts["token_budget"],
            width_multiple=opts["width_multiple"],
            max_len=opts["max_len"],
            block_len=opts["block_len"],
            exclude_first_token=opts["exclude_first_token"],
            max_norm_multiple=opts["max_norm_multiple"],
            max_epochs=opts.get("epochs"),
        ),
    )


@click.command("train")
@stream_options
@click.option(
    "--activations",
    type=click.Path(exists=True, file_okay=False),
    help="Train from a `fast-steer harvest` folder instead of running the model.",
)
@click.option(
    "--epochs",
    type=int,
    help="Stop after this many passes over the data.  [default: as many as --tokens needs]",
)
@config_option(
    SPEC,
    "arch",
    "--arch",
    "archs",
    multiple=True,
    type=click.Choice(architectures()),
    help="SAE architecture(s); several values sweep SAEs on one stream.",
)
@config_option(
    SPEC, "expansion", "--expansion", "expansions", multiple=True, type=int, help="d_sae / d_in (repeatable)."
)
@click.option(
    "--l1",
    "l1_coefficients",
    multiple=True,
    type=float,
    help="L1 coefficient(s) of standard SAEs (repeatable).  [default: the preset's]",
)
@click.option(
    "--l0",
    "l0_coefficients",
    multiple=True,
    type=float,
    help="L0 coefficient(s) of jumprelu SAEs (repeatable).  [default: the preset's]",
)
@click.option("--k", "ks", multiple=True, type=int, help="k of topk SAEs (repeatable).")
@click.option("--tokens", type=_Tokens(), help="Training tokens (e.g. 2M).  [default: the preset's]")
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (required unless --dry-run)."
)
@config_option(
    TRAIN,
    "preset",
    "--preset",
    type=click.Choice(["default", "paper"]),
    help="paper: App. C of arXiv 2506.07691, value for value; default: a useful SAE on a CPU in minutes.",
)
@click.option("--dry-run", is_flag=True, help="Print the resolved run config as JSON and exit.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint in --out.")
@click.option("--batch-size", type=int, help="Tokens per optimiser step.")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option("--lr-end", type=float, help="Learning-rate floor of the cosine decay.")
@click.option("--seed", type=int, help="Seed of the SAE initialisation.")
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints (0: none).")
@click.option("--log-every", type=int, help="Steps between JSONL log lines.")
@click.option(
    "--gsnr-every", type=int, help="Steps between gradient signal-to-noise logs (a multiple of --log-every)."
)
@click.option(
    "--autocast/--no-autocast",
    default=None,
    help="bf16 autocast for the SAE step (default: where bf16 matmuls are native: CUDA, AMX CPUs).",
)
@click.option(
    "--jumprelu-bandwidth", type=float, help="STE bandwidth.  [default: the preset's: 0.1, paper 0.001]"
)
@click.option(
    "--jumprelu-init-threshold",
    type=float,
    help="Initial threshold.  [default: the preset's: 0.5, paper 0.001]",
)
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), help="Write training-curve PNGs here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(activations, archs, expansions, l1_coefficients, l0_coefficients, ks, tokens, out_dir, preset, dry_run, resume,
                  batch_size, lr, lr_end, seed, checkpoint_every, log_every, gsnr_every, autocast, jumprelu_bandwidth,
                  jumprelu_init_threshold, plot_dir, quiet, **opts) -> None:  # fmt: skip
    """Train SAEs on the residual stream of a chat model (FAST by default) and write SAELens folders.

    The token ids of the data are kept by content in <cache>/tokens (~/.cache/fast-steer, or
    $FAST_STEER_CACHE): a later run over the same records reads them back instead of tokenising
    again. FAST_STEER_TOKEN_CACHE=0 turns that off.
    """
    from train.config import preset_config
    from train.pipeline import train
    from train.plots import plot_training
    from train.trainer import LOG_FILE

    specs = sweep_specs(archs, expansions, l1_coefficients, l0_coefficients, ks, jumprelu_bandwidth,
                        jumprelu_init_threshold)  # fmt: skip
    training = preset_config(preset, saes=specs, total_tokens=tokens, batch_size=batch_size, lr=lr,
                             lr_end=lr_end, seed=seed, checkpoint_every=checkpoint_every,
                             log_every=log_every, gsnr_every=gsnr_every, autocast=autocast)  # fmt: skip
    cfg = run_config_from_options(opts, training, activations)
    if dry_run:
        click.echo(json.dumps(dry_run_report(cfg), indent=2))
        return
    if not out_dir:
        raise click.UsageError("--out is required (unless --dry-run)")
    dist = _dist_context(cfg.device)
    result = train(cfg, out_dir, resume=resume, progress=not quiet, dist=dist)
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


def dry_run_report(cfg) -> dict:
    """The resolved run config, with the step counts its fractions resolve to and the initialisation."""
    return {
        **cfg.to_dict(),
        "schedule": cfg.training.schedule(),
        "initialisation": {
            "b_dec": f"geometric median of the first {cfg.init_tokens} tokens (half the mixing buffer)",
            "W_dec": "Kaiming-uniform, rows at unit norm",
            "W_enc": "Kaiming-uniform, independent of W_dec"
            if cfg.training.encoder_init == "kaiming"
            else "W_dec transposed",
            "activations": "raw (not normalised)"
            if cfg.training.normalize_activations == "none"
            else f"scaled to mean norm sqrt(d_in), factor estimated on those {cfg.init_tokens} tokens",
        },
    }


@click.command("harvest")
@stream_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    required=True,
    help="Cache folder (outside the repo): shards + harvest.json.",
)
@click.option("--tokens", type=_Tokens(), help="Stop after this many real tokens.  [default: one whole pass]")
@click.option(
    "--cache-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Dtype the activations are stored in.",
)
@click.option(
    "--shard-tokens", type=_Tokens(), default="256k", show_default=True, help="Tokens per shard file."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def harvest_command(out_dir, tokens, cache_dtype, shard_tokens, quiet, **opts) -> None:
    """Harvest residual activations once (with token ids, sequences and positions) for `train --activations`."""
    from train.activation_cache import write_cache
    from train.config import TrainConfig
    from train.pipeline import open_stream

    # the batch size only sizes the mixing buffer check (harvesting does not mix); the tokens (a whole pass:
    # unbounded) decide whether `--compile`'s auto compiles
    cfg = run_config_from_options(opts, TrainConfig(total_tokens=tokens or sys.maxsize, batch_size=1))
    stream, source = open_stream(cfg, _dist_context(cfg.device))
    manifest = write_cache(stream, out_dir, model_source=source, dtype=cache_dtype, max_tokens=tokens,
                           shard_tokens=shard_tokens, progress=not quiet)  # fmt: skip
    click.echo(json.dumps({"out": out_dir, "tokens": manifest["tokens"], "shards": len(manifest["shards"]),
                           "sequences": manifest["stats"]["sequences"], "dtype": cache_dtype}, indent=2))  # fmt: skip


def register(group: click.Group) -> None:
    group.add_command(train_command)
    group.add_command(harvest_command)

"""The `fast-steer` command line: one click group, one module per family of commands."""

from __future__ import annotations

import importlib
import logging

import click

# Each module defines click commands and a `register(group)` function.
COMMAND_MODULES = (
    "apps.cli_model",
    "apps.cli_bench",
    "apps.cli_hub",
    "apps.cli_features",
    "apps.cli_lmeval",
    "apps.cli_chat",
    "apps.cli_serve",
    "apps.bench_steer",
    "apps.bench_serve",
    "apps.cli_train",
    "apps.cli_eval",
    "apps.bench_train",
    "apps.bench_eval",
    "apps.cli_demo",
    "apps.cli_experiment",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """fast-steer: train SAEs on chat models with FAST, publish them, and steer generation."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(main)

"""The `fast-steer` command line: one click group, one module per family of commands."""

from __future__ import annotations

import importlib
import logging

import click

# Each module defines click commands and a `register(group)` function.
COMMAND_MODULES = (
    "apps.cli.model",
    "apps.cli.bench",
    "apps.cli.hub",
    "apps.cli.features",
    "apps.cli.lm_eval",
    "apps.cli.chat",
    "apps.cli.serve",
    "apps.cli.train",
    "apps.cli.eval",
    "apps.cli.demo",
    "apps.cli.experiment",
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

"""The `fast-steer` command line: one click group, one module per family of commands."""

from __future__ import annotations

import importlib
import logging

import click

from steer.errors import FastSteerError

log = logging.getLogger(__name__)

# Each module defines click commands and a `register(group)` function.
COMMAND_MODULES = (
    "apps.cli.model",
    "apps.cli.bench",
    "apps.cli.hub",
    "apps.cli.features",
    "apps.cli.interp",
    "apps.cli.lm_eval",
    "apps.cli.chat",
    "apps.cli.serve",
    "apps.cli.train",
    "apps.cli.eval",
    "apps.cli.demo",
    "apps.cli.experiment",
)


class FastSteerGroup(click.Group):
    """The group that turns a `FastSteerError` from any command into one clean line (`Error: ...`, exit 1).

    The one place where the CLI catches errors: any other exception is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FastSteerError as exc:
            log.debug("%s", type(exc).__name__, exc_info=True)
            raise click.ClickException(str(exc)) from exc


@click.group(cls=FastSteerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """fast-steer: train SAEs on chat models with FAST, publish them, and steer generation."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(main)

"""`fast-steer bench ...`: speed benchmarks that print JSON. Parts register themselves on `bench_group`."""

from __future__ import annotations

import click


@click.group("bench")
def bench_group() -> None:
    """Speed benchmarks (JSON on stdout; ratios measured within one run)."""


@bench_group.command("all")
@click.pass_context
def bench_all(ctx: click.Context) -> None:
    """Run every benchmark part with its defaults, one after the other."""
    for name, command in sorted(bench_group.commands.items()):
        if name != "all":
            click.echo(f"# bench {name}", err=True)
            ctx.invoke(command)


def register(group: click.Group) -> None:
    group.add_command(bench_group)

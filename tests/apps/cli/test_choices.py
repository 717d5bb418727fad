"""Every option that names a training method, an SAE architecture, an edit op or a position mode offers the
values of the one place that defines them, never a copy."""

from __future__ import annotations

import click

from apps.cli import main
from steer.sae import architectures
from steer.spec import OPS
from train.sequences import METHODS


def _options(group: click.Group, prefix: str = ""):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from _options(command, f"{prefix}{name} ")
            continue
        for param in command.params:
            if isinstance(param, click.Option):
                yield f"{prefix}{name}", param


def test_choice_options_read_the_registries():
    seen = {"--method": 0, "--arch": 0, "--op": 0}
    for command, option in _options(main):
        flag = max(option.opts, key=len)
        if flag not in seen:
            continue
        seen[flag] += 1
        assert isinstance(option.type, click.Choice), f"{command} {flag} is not a choice"
        choices = tuple(option.type.choices)
        if flag == "--method":
            assert choices == METHODS, (command, choices)
        elif flag == "--arch":
            assert set(choices) <= set(architectures()) and choices, (command, choices)
        else:
            assert choices == OPS, (command, choices)
    assert seen["--method"] >= 2 and seen["--arch"] >= 3 and seen["--op"] >= 1, seen

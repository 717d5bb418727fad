"""Every `fast-steer` option that sets a config dataclass field reads its default from that field.

The CLI declares the mapping once, with `apps.cli.options.config_option` (the option's default is a
`FieldDefault` naming the class and field). An option with a default of its own and no field to read it from
must be listed in `NO_FIELD`, so a new option that copies a config's default by hand fails here.
"""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from apps.cli import main
from apps.cli.options import FieldDefault

HUB = "hub's model reference / resolve_device / load_model dtype, no config"
PAGE = "where the page listens, no config"

# command -> {parameter name: why it has a default of its own}
NO_FIELD: dict[str, dict[str, str]] = {
    "model": {"dtype": HUB},
    "push": {"commit_message": "a Hub commit message"},
    "features": {
        "model_ref": HUB,
        "device": HUB,
        "dtype": HUB,
        "n_conversations": "discover_features / top_contexts arguments, no config",
        "top_k": "discover_features argument, no config",
        "n_contexts": "top_contexts argument, no config",
        "window": "top_contexts argument, no config",
    },
    "chat": {"model_ref": HUB, "device": HUB, "dtype": HUB},
    "serve": {
        "model_ref": HUB,
        "device": HUB,
        "dtype": HUB,
        "host": "where the server listens, no config",
        "port": "where the server listens, no config",
        "batch_window_ms": "make_service's `window`, in seconds (apps.serve.server.DEFAULT_WINDOW), no config",
        "engine": "which engine class make_service builds (hf: Engine, vllm: VllmEngine), no config",
    },
    "harvest": {
        "cache_dtype": "write_cache argument, no config",
        "shard_tokens": "write_cache argument, no config",
    },
    "eval": {"device": HUB, "split": "evaluate_folder argument, no config"},
    "demo": {
        "model_ref": HUB,
        "device": HUB,
        "conversations": "the demo's feature-discovery sample, no config",
        "host": PAGE,
        "port": PAGE,
    },
    "run": {"demo": "whether to open the page at the end, no config", "host": PAGE, "port": PAGE},
    "experiment sweep": {
        "n_conversations": "the CLI's held-out sample, no config",
        "model_dtype": HUB,
        "device": HUB,
    },
    "experiment steer-eval": {
        "n_conversations": "the CLI's held-out sample, no config",
        "model_dtype": HUB,
        "device": HUB,
    },
    "experiment report": {"doc": "write_doc argument, no config"},
    "bench train": {
        name: "apps.bench.train.run_bench arguments, no config"
        for name in (
            "model_ref",
            "data",
            "layer",
            "expansion",
            "batch_size",
            "tokens",
            "buffer_tokens",
            "repeats",
            "dtype",
            "device",
        )
    },  # fmt: skip
    "bench eval": {
        name: "apps.bench.eval.run_bench arguments, no config"
        for name in ("model_ref", "device", "dtype", "data", "conversations", "repeats", "expansion")
    },
}


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


COMMANDS = dict(_commands(main))
OPTIONS = [
    (name, option)
    for name, command in COMMANDS.items()
    for option in command.params
    if isinstance(option, click.Option)
]


def _own_default(option: click.Option) -> bool:
    """Whether the option has a default value of its own (where a copied default could hide)."""
    value = option.default
    if value is None or value is getattr(click.core, "UNSET", None):
        return False
    return not (option.is_flag and value is False)


def _field_default(config: type, name: str):
    """The default of dataclass field `name`, read here without the CLI's helper."""
    item = {f.name: f for f in dataclasses.fields(config)}[name]
    if item.default is not dataclasses.MISSING:
        return item.default
    assert item.default_factory is not dataclasses.MISSING, f"{config.__name__}.{name} has no default"
    return item.default_factory()


def test_the_walk_reaches_every_command():
    assert {"train", "serve", "demo", "run", "experiment reproduce", "experiment sweep",
            "experiment steer-eval", "bench steer", "bench serve"} <= set(COMMANDS)  # fmt: skip
    assert sum(isinstance(o.default, FieldDefault) for _, o in OPTIONS) > 50


@pytest.mark.parametrize(
    ("command", "option"),
    [(c, o) for c, o in OPTIONS if isinstance(o.default, FieldDefault)],
    ids=lambda x: x if isinstance(x, str) else x.opts[0],
)
def test_option_default_is_its_field_default(command, option):
    mapped = option.default
    expected = _field_default(mapped.config_class(), mapped.field)
    if option.multiple and not isinstance(expected, (list, tuple)):
        expected = (expected,)  # a repeatable option defaults to the one field value
    value = option.get_default(click.Context(COMMANDS[command]))
    assert value == expected, f"`fast-steer {command} {option.opts[0]}`"


@pytest.mark.parametrize(("command", "option"), [(c, o) for c, o in OPTIONS if _own_default(o) and not isinstance(o.default, FieldDefault)],
                         ids=lambda x: x if isinstance(x, str) else x.opts[0])  # fmt: skip
def test_an_option_with_its_own_default_reads_a_field_or_is_listed(command, option):
    assert option.name in NO_FIELD.get(command, {}), (
        f"`fast-steer {command} {option.opts[0]}` has the literal default {option.default!r}: read it from the "
        "config field it sets with apps.cli.options.config_option, or list it in NO_FIELD with the reason"
    )


def test_no_field_lists_only_options_with_a_literal_default():
    options = {(c, o.name): o for c, o in OPTIONS}
    for command, names in NO_FIELD.items():
        for name in names:
            option = options.get((command, name))
            assert option is not None, f"NO_FIELD names `{command}` option {name!r}, which does not exist"
            assert _own_default(option) and not isinstance(option.default, FieldDefault), (
                f"NO_FIELD names `{command}` option {name!r}, which has no literal default"
            )


def test_help_shows_the_field_default():
    from apps.evaluation.sweep import SweepConfig
    from apps.serve.schemas import Limits

    result = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"Rows per batch.  [default: {Limits().max_batch};" in result.output
    result = CliRunner().invoke(main, ["experiment", "sweep", "--help"], terminal_width=200)
    strengths = ", ".join(f"{s:g}" for s in SweepConfig.strengths)  # a tuple of floats, shown as numbers
    assert f"[default: {strengths}]" in result.output

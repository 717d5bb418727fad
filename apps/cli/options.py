"""Click options shared by several `fast-steer` commands, and `config_option`: the one way an option takes
its default from the config dataclass field it sets (read, never copied)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from hub import DeviceMap


def default_of(config: type, name: str) -> Any:
    """The default of dataclass field `name` of `config` (its `default_factory` called)."""
    for item in dataclasses.fields(config):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            raise TypeError(f"{config.__name__}.{name} has no default")
    raise TypeError(f"{config.__name__} has no field {name!r}")


class FieldDefault:
    """A click default read from a config dataclass field when click first needs it (parsing, `--help`).

    `config` is the class or `"module:Class"`; the string form keeps `fast-steer --help` from importing
    config modules (most import torch). `str()` is what `--help` shows.
    """

    def __init__(self, config: type | str, field: str, *, many: bool = False) -> None:
        self.config, self.field, self.many = config, field, many

    def config_class(self) -> type:
        if isinstance(self.config, type):
            return self.config
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self) -> Any:
        value = default_of(self.config_class(), self.field)
        if self.many and not isinstance(value, (list, tuple)):
            return (value,)  # one field value as the default of a repeatable option
        return value

    def __str__(self) -> str:
        value = self()
        if value is None:
            return ""  # nothing to show (click shows no empty default)
        return ", ".join(map(_shown, value)) if isinstance(value, (list, tuple)) else _shown(value)

    def __repr__(self) -> str:
        return f"FieldDefault({self.config!r}, {self.field!r})"


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_option(config: type | str, field: str, *param_decls: str, **attrs: Any) -> Callable:
    """`click.option(*param_decls, **attrs)` whose default is `config`'s field `field` (shown in `--help`)."""
    if "default" in attrs:
        raise TypeError(f"option {param_decls} sets {field}: its default is read from the field, not given")
    attrs.setdefault("show_default", True)
    return click.option(
        *param_decls, default=FieldDefault(config, field, many=attrs.get("multiple", False)), **attrs
    )


def stack(*options: Callable) -> Callable:
    """One decorator made of several options, in the order given (as if written one above the other)."""

    def apply(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def request_limit_options(
    config: str, *, new_tokens: click.ParamType | None = None, prompt_tokens: click.ParamType | None = None
) -> Callable:
    """`--max-new-tokens` and `--max-prompt-tokens`, the `apps.limits.RequestLimits` fields of `config` (a
    surface's limits class); each value must be positive unless its own type says more."""
    return stack(
        config_option(config, "max_new_tokens", "--max-new-tokens", type=new_tokens or click.IntRange(1),
                      help="Most new tokens a reply may ask for."),
        config_option(config, "max_prompt_tokens", "--max-prompt-tokens", type=prompt_tokens or click.IntRange(1),
                      help="Longest conversation (in tokens, chat template applied) a request may send."),
    )  # fmt: skip


class Numbers(click.ParamType):
    """Comma-separated numbers (`0,15,25`) -> a tuple of `kind` (float or int); a tuple (a field default)
    passes through."""

    def __init__(self, kind: type = float) -> None:
        self.kind = kind
        self.name = "INTEGERS" if kind is int else "NUMBERS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.kind(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            example = "1,4,8" if self.kind is int else "0,15,25"
            self.fail(f"{value!r}: expected comma-separated {self.name.lower()} like {example}", param, ctx)


class Words(click.ParamType):
    """Comma-separated words (`a,b`) -> a tuple of str; a tuple (a field default) passes through."""

    name = "WORDS"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(x.strip() for x in str(value).split(",") if x.strip())


_MODEL_HELP = "Model: 'default', a folder or a Hub id."

model_option = click.option("--model", "model_ref", default="default", show_default=True, help=_MODEL_HELP)


def config_model_option(config: type | str) -> Callable:
    """`--model` of a command whose config has a `model` field."""
    return config_option(config, "model", "--model", "model_ref", help=_MODEL_HELP)


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from hub import resolve_device

    try:
        return resolve_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


_DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (auto: CUDA when present, else MPS, else CPU)."

device_option = click.option(
    "--device", default="auto", show_default=True, callback=_check_device, help=_DEVICE_HELP
)


def config_device_option(config: type | str) -> Callable:
    """`--device` of a command whose config has a `device` field."""
    return config_option(config, "device", "--device", callback=_check_device, help=_DEVICE_HELP)


def device_map_options(fn: Callable) -> Callable:
    """`--device-map`, `--max-memory` and `--offload-folder`, handed to the command as one `device_map`
    argument (a `hub.DeviceMap`, or None without `--device-map`).

    The rule: `--device-map` places the model itself, so it is refused beside an explicit `--device` (the
    default `auto` is fine); `--max-memory` and `--offload-folder` only mean something with `--device-map`.
    """

    @functools.wraps(fn)
    def command(*args: Any, max_memory: tuple[str, ...], offload_folder: str | None, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        kwargs["device_map"] = _device_map(ctx, kwargs.pop("device_map"), max_memory, offload_folder)
        return fn(*args, **kwargs)

    return stack(
        click.option("--device-map", metavar="STRATEGY",
                     help="Spread the model over devices with accelerate (a model larger than one device): auto "
                          "(GPUs in order, then CPU, then disk), balanced, balanced_low_0 or sequential. Not with "
                          "--device; each SAE runs on the device of the layer it reads."),
        click.option("--max-memory", multiple=True, metavar="DEVICE=SIZE",
                     help="Most memory a device may hold under --device-map, e.g. 0=20GiB or cpu=60GiB "
                          "(repeatable; default: all there is)."),
        click.option("--offload-folder", type=click.Path(file_okay=False),
                     help="Folder for the weights --device-map offloads to disk (when --max-memory is too small)."),
    )(command)  # fmt: skip


def _device_map(
    ctx: click.Context, strategy: str | None, max_memory: tuple[str, ...], offload_folder: str | None
) -> DeviceMap | None:
    """The `hub.DeviceMap` of the options, checked against each other and against `--device`."""
    from click.core import ParameterSource

    from hub import DeviceMap

    if strategy is None:
        given = [
            name
            for name, value in (("--max-memory", max_memory), ("--offload-folder", offload_folder))
            if value
        ]
        if given:
            raise click.UsageError(
                f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only with --device-map "
                "(e.g. --device-map auto)"
            )
        return None
    if ctx.get_parameter_source("device") not in (None, ParameterSource.DEFAULT):
        raise click.UsageError(
            f"--device-map {strategy} places the model itself (over the devices --max-memory allows), so it "
            f"conflicts with --device {ctx.params['device']}: give one or the other"
        )
    return DeviceMap.parse(strategy, max_memory, offload_folder)  # a bad value: ConfigError, naming the form

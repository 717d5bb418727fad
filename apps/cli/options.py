"""Click options shared by several `fast-steer` commands."""

import click

model_option = click.option(
    "--model",
    "model_ref",
    default="default",
    show_default=True,
    help="Model: 'default', a folder or a Hub id.",
)


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from hub import resolve_device

    try:
        return resolve_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_check_device,
    help="auto | cpu | cuda | cuda:N | mps (auto: CUDA when present, else MPS, else CPU).",
)

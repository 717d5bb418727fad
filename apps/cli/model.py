"""`fast-steer model`: resolve a model reference and print where it lives and its shape."""

from __future__ import annotations

import json

import click


@click.command("model")
@click.argument("ref", default="default")
@click.option("--dtype", default="float32", show_default=True, help="float32 | bfloat16 | float16")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def model_command(ref: str, dtype: str, as_json: bool) -> None:
    """Load REF ('default', a local folder or a Hub id) and describe it."""
    from hub import describe_model, load_model

    info = describe_model(load_model(ref, dtype=dtype))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        click.echo(f"{key:>18}: {value}")


def register(group: click.Group) -> None:
    group.add_command(model_command)

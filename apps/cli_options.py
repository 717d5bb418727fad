"""Click options shared by several `fast-steer` commands."""

import click

model_option = click.option(
    "--model",
    "model_ref",
    default="default",
    show_default=True,
    help="Model: 'default', a folder or a Hub id.",
)

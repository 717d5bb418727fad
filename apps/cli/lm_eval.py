"""`fast-steer lm-eval`: lm-eval's own CLI with the `fast-steer` model and local benchmark tasks (wiring of
`apps.evaluation.lm_eval.run`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from apps.cli.options import device_map_options
from apps.evaluation.lm_eval.run import EVAL_DATA_ENV, run_lm_eval

if TYPE_CHECKING:
    from hub import DeviceMap


@click.command(
    "lm-eval",
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "allow_interspersed_args": True,
    },
)
@click.option(
    "--compare", is_flag=True, help="Evaluate the plain and the steered model in one run; print one table."
)
@click.option(
    "--eval-data",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=EVAL_DATA_ENV,
    default=None,
    help=f"Folder with the local benchmark JSONL files [default: ${EVAL_DATA_ENV}, else the shared data's eval folder if present].",
)
@click.option(
    "--allow-unsteered",
    is_flag=True,
    help="Go on when a spec edits no position in a whole task (by default the run stops and says why).",
)
@device_map_options
@click.argument("lm_eval_args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(
    compare: bool,
    eval_data: Path | None,
    allow_unsteered: bool,
    device_map: DeviceMap | None,
    lm_eval_args: tuple[str, ...],
) -> None:
    """Run lm-eval with the `fast-steer` model (any lm-eval option; see `lm-eval run --help`).

    \b
    fast-steer lm-eval --model_args pretrained=default,spec=spec.json --tasks mmlu_local --limit 20 --apply_chat_template
    fast-steer lm-eval --model_args pretrained=default,spec=spec.json --tasks gsm8k_local --compare --apply_chat_template
    fast-steer lm-eval ls tasks
    """
    run_lm_eval(
        lm_eval_args,
        eval_data=eval_data,
        compare=compare,
        echo=click.echo,
        allow_unsteered=allow_unsteered,
        device_map=device_map,
    )


def register(group: click.Group) -> None:
    group.add_command(lm_eval_command)

"""`fast-steer chat`: unsteered and steered replies side by side, one-shot or as an interactive chat."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from apps.cli.options import config_option, device_map_options, device_option, model_option
from steer.spec import OPS, POSITION_MODES

if TYPE_CHECKING:
    from hub import DeviceMap


@dataclass
class ChatOptions:
    """Generation settings shared by the unsteered and the steered reply."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        extra = {"temperature": self.temperature} if self.do_sample else {}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "seed": self.seed,
            **extra,
        }


@click.command("chat")
@click.argument("prompt", required=False)
@model_option
@click.option("--sae", "sae_source", help="SAE folder or Hub repo id (overrides the SAE of --spec).")
@click.option("--sae-id", help="Sub-folder of --sae holding the SAE.")
@click.option(
    "--spec", "spec_path", type=click.Path(dir_okay=False), help="Intervention spec file (.json/.yaml)."
)
@click.option("--feature", type=int, help="Feature to edit (instead of --spec).")
@click.option(
    "--strength",
    type=float,
    help="add: norm of the added direction (a spec's unit; the demo's and steer-eval's strength s adds "
    "s/100 x R, and their exported specs hold that norm); scale: factor; set: value.",
)
@config_option("steer.spec:Edit", "op", "--op", type=click.Choice(OPS))
@config_option(
    "steer.spec:Intervention",
    "positions",
    "--positions",
    help=f"{' | '.join(POSITION_MODES)}, or comma-separated tokens / ids (e.g. '<|im_start|>,198').",
)
@click.option("--layer", type=int, help="Decoder layer (default: the layer in the SAE's metadata).")
@click.option("--system", help="System prompt for the conversation.")
@config_option(ChatOptions, "max_new_tokens", "--max-new-tokens", type=int)
@click.option(
    "--sample", is_flag=True, help="Sample (same seed for both replies) instead of greedy decoding."
)
@config_option(ChatOptions, "temperature", "--temperature", type=float)
@config_option(ChatOptions, "seed", "--seed", type=int)
@click.option("--dtype", default="float32", show_default=True, help="float32 | bfloat16 | float16")
@device_option
@device_map_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per turn instead of columns.")
def chat_command(
    prompt: str | None,
    model_ref: str,
    sae_source: str | None,
    sae_id: str | None,
    spec_path: str | None,
    feature: int | None,
    strength: float | None,
    op: str,
    positions: str,
    layer: int | None,
    system: str | None,
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    seed: int,
    dtype: str,
    device: str,
    device_map: DeviceMap | None,
    as_json: bool,
) -> None:
    """Chat with a model, showing the unsteered and the steered reply to PROMPT side by side.

    The steered reply's title says how many positions the spec edited (0: its positions matched nothing).

    Without PROMPT, reads one user turn per line from stdin (multi-turn; '/reset' clears the
    history, '/quit' or end of input stops). Both conversations keep their own replies.
    """
    from hub import load_model
    from steer import SteeredModel

    if (spec_path is None) == (feature is None):
        raise click.UsageError("give either --spec FILE or --feature K (with --sae and --strength)")
    model, tokenizer = load_model(model_ref, dtype=dtype, device=device, device_map=device_map)
    sm = SteeredModel(model, tokenizer)
    specs = _build_specs(sm, spec_path, sae_source, sae_id, feature, strength, op, positions, layer)
    compiled = [sm.compile(spec) for spec in specs]  # checked once, before the first turn
    options = ChatOptions(max_new_tokens, sample, temperature, seed)
    label = "; ".join(_describe(s, sm.load_sae(s).labels) for s in specs)
    start = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        _turn(sm, compiled, start, start, prompt, options, label, as_json)
        return
    plain_history, steered_history = list(start), list(start)
    stdin = sys.stdin
    while True:
        if stdin.isatty():
            click.echo("you> ", nl=False)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return
        text = line.strip()
        if text == "/reset":
            plain_history, steered_history = list(start), list(start)
            click.echo("(history cleared)")
        elif text:
            plain, steered = _turn(
                sm, compiled, plain_history, steered_history, text, options, label, as_json
            )
            plain_history += [{"role": "user", "content": text}, {"role": "assistant", "content": plain}]
            steered_history += [{"role": "user", "content": text}, {"role": "assistant", "content": steered}]


def _build_specs(sm, spec_path, sae_source, sae_id, feature, strength, op, positions, layer) -> list:
    """The interventions asked for on the command line (a spec file, or one feature edit)."""
    from steer import Edit, Intervention, SpecError, load_interventions
    from steer.spec import load_sae_reference, parse_sae_ref

    sae = None
    if sae_source is not None:
        sae = load_sae_reference(
            parse_sae_ref(sae_source, sae_id), device=sm.device, expected_d_in=sm.d_model
        )
    if spec_path is not None:
        specs = load_interventions(spec_path)
        return [s.with_sae(sae) if sae is not None else s for s in specs]
    if sae is None:
        raise SpecError("--feature needs --sae (the SAE folder or Hub repo holding the feature)")
    if strength is None and op != "ablate":
        raise SpecError(f"--op {op} needs --strength")
    if layer is None:
        layer = sae.layer
        if layer is None:
            raise SpecError("the SAE's metadata names no layer; pass --layer L")
    return [
        Intervention(
            layer=layer,
            sae=sae,
            edits=[Edit(feature, op, 0.0 if strength is None else strength)],
            positions=_parse_positions(positions),
        )
    ]


def _parse_positions(text: str) -> str | list[str | int]:
    if text in POSITION_MODES:
        return text
    items = [item.strip() for item in text.split(",") if item.strip()]
    return [int(item) if item.isdigit() else item for item in items]


def _describe(spec, labels) -> str:
    """`L3 #12 'polite tone' add 8 @special`: the spec, each feature with its label when its SAE has labels."""

    def named(feature: int) -> str:
        label = None if labels is None else labels.get(feature)
        return f"#{feature}" if label is None else f"#{feature} {label!r}"

    edits = ", ".join(
        f"{named(e.feature)} {e.op}" + ("" if e.op == "ablate" else f" {e.strength:g}") for e in spec.edits
    )
    where = spec.positions if isinstance(spec.positions, str) else ",".join(map(str, spec.positions))
    return f"L{spec.layer} {edits} @{where}"


def _turn(sm, compiled, plain_history, steered_history, text, options, label, as_json) -> tuple[str, str]:
    """Generate both replies to `text`, print them (the steered one with the positions its spec edited),
    and return them."""
    user = [{"role": "user", "content": text}]
    kwargs = options.generate_kwargs()
    plain = sm.chat(plain_history + user, **kwargs)
    with sm.steer(compiled) as report:
        steered = sm.chat(steered_history + user, **kwargs)
    if as_json:
        row = {"prompt": text, "unsteered": plain, "steered": steered, "steering": f"steered ({label})"}
        click.echo(json.dumps(row | {"steered_positions": report.positions}))
    else:
        click.echo(
            side_by_side(("unsteered", plain), (f"steered {report.positions} positions ({label})", steered))
        )
    return plain, steered


def side_by_side(left: tuple[str, str], right: tuple[str, str], width: int | None = None) -> str:
    """Two titled texts as columns separated by ' | ', wrapped to the terminal width."""
    total = width or shutil.get_terminal_size((120, 24)).columns
    col = max(24, (total - 3) // 2)

    def lines(text: str) -> list[str]:
        out = []
        for paragraph in text.splitlines() or [""]:
            out += textwrap.wrap(paragraph, col) or [""]
        return out

    columns = [[title[:col], "-" * col, *lines(body)] for title, body in (left, right)]
    height = max(map(len, columns))
    for column in columns:
        column += [""] * (height - len(column))
    return "\n".join(f"{a:<{col}} | {b}".rstrip() for a, b in zip(*columns, strict=True))


def register(group: click.Group) -> None:
    group.add_command(chat_command)

"""`fast-steer demo` (the Gradio app) and `fast-steer run` (the main job: train or reuse an SAE, evaluate
it, discover its features, open the demo with them preselected)."""

from __future__ import annotations

from pathlib import Path

import click

from apps.cli.options import (
    config_device_option,
    config_model_option,
    config_option,
    device_option,
    model_option,
    request_limit_options,
    stack,
)
from train.config import coefficient_architectures

DEFAULT_PORT = 7860
DEMO_LIMITS = "apps.demo.settings:DemoLimits"
MAIN_JOB = "apps.jobs.main_job:MainJobConfig"
AUTH_ENV = "FAST_STEER_DEMO_AUTH"  # apps.demo.access.AUTH_ENV (not imported here: apps.demo loads gradio)


# Where the page listens, and what one request may ask for (`demo` and `run`).
_serve_options = stack(
    click.option(
        "--host",
        default="127.0.0.1",
        show_default=True,
        help="Address to bind. Anything but loopback exposes the model to your network, and needs --auth.",
    ),
    click.option(
        "--auth",
        envvar=AUTH_ENV,
        default=None,
        metavar="USER:PASSWORD",
        help=f"Log in to the page with this user and password (required off loopback) [env: {AUTH_ENV}].",
    ),
    click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="Port to serve on."),
    request_limit_options(
        DEMO_LIMITS, new_tokens=click.IntRange(1, 4096), prompt_tokens=click.IntRange(16, 65536)
    ),
)


def _limits(max_new_tokens: int, max_prompt_tokens: int):
    from apps.demo import DemoLimits

    return DemoLimits(max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)


def _access(host: str, auth: str | None):
    """The page's login, checked against `host` before any model is loaded."""
    from apps.demo.access import check_bind, parse_auth

    login = parse_auth(auth)
    check_bind(host, login)
    return login


def _start(backend, host: str, port: int, login) -> None:
    from apps.demo import build_app, launch_app

    click.echo(f"demo on http://{host}:{port} (Ctrl+C stops it)" + (" behind a login" if login else ""))
    launch_app(build_app(backend), backend, host=host, port=port, auth=login)


@click.command("demo")
@model_option
@device_option
@click.option(
    "--sae",
    "sae_args",
    multiple=True,
    required=True,
    metavar="DIR|REPO:ID",
    help="SAE folder, or Hub repo and sub-folder; repeat for several.",
)
@click.option(
    "--data",
    default=None,
    help="Chat data for feature discovery and contexts (default: the shared chat data).",
)
@click.option(
    "--conversations",
    type=click.IntRange(1, 1000),
    default=32,
    show_default=True,
    help="Held-out conversations used for feature discovery.",
)
@click.option(
    "--feature", "features", type=int, multiple=True, help="Preselect an `add` edit of this feature."
)
@config_option(
    MAIN_JOB,
    "preselect_strength",
    "--strength",
    type=float,
    help="Strength s of preselected edits (the study's scale: adds s/100 x the special-position norm).",
)
@_serve_options
def demo_command(
    model_ref,
    device,
    sae_args,
    data,
    conversations,
    features,
    strength,
    host,
    auth,
    port,
    max_new_tokens,
    max_prompt_tokens,
) -> None:
    """Chat with a model plain and steered through SAE features, side by side, in the browser."""
    login = _access(host, auth)
    from apps.demo import DemoBackend, EditRow
    from apps.demo.loading import discover, load_demo_sae
    from apps.jobs.main_job import resolve_data, spread
    from hub import load_model
    from steer.spec import parse_sae_ref
    from train.data import load_conversations

    refs = [parse_sae_ref(arg) for arg in sae_args]
    model, tok = load_model(model_ref, device=device)
    saes = [load_demo_sae(ref, model) for ref in refs]
    source = resolve_data(data)
    sample = spread(load_conversations(source, split="held_out").items, conversations)
    for s in saes:
        click.echo(f"discovering special-token features of {s.name} on {len(sample)} conversations")
        s.top_features = discover(model, tok, s, sample)
    backend = DemoBackend(
        model,
        tok,
        saes,
        model_ref=model_ref,
        limits=_limits(max_new_tokens, max_prompt_tokens),
        sample_conversations=sample[:16],
    )
    if features:
        backend.preselect = backend.check_rows(
            None, [EditRow(k, "add", strength, "special") for k in features]
        )
    _start(backend, host, port, login)


@click.command("run")
@config_model_option(MAIN_JOB)
@config_device_option(MAIN_JOB)
@config_option(
    MAIN_JOB, "data", "--data", help="Chat data (default: ../shared/data/chat, else a Hub dataset)."
)
@config_option(
    MAIN_JOB, "layer", "--layer", type=click.IntRange(0), help="Decoder block whose output the SAE reads."
)
@config_option(MAIN_JOB, "tokens", "--tokens", type=click.IntRange(1), help="Training tokens.")
@config_option(MAIN_JOB, "arch", "--arch", type=click.Choice(coefficient_architectures()))
@config_option(MAIN_JOB, "expansion", "--expansion", type=click.IntRange(1), help="d_sae / d_model.")
@config_option(MAIN_JOB, "batch_size", "--batch-size", type=click.IntRange(1), help="Tokens per step.")
@config_option(
    MAIN_JOB,
    "eval_conversations",
    "--conversations",
    type=click.IntRange(1, 1000),
    help="Held-out conversations for evaluation and for feature discovery.",
)
@config_option(
    MAIN_JOB,
    "cache",
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the SAE, its evaluation and features are kept (default: <fast-steer cache>/main-job).",
)
@click.option(
    "--keep-first-token",
    is_flag=True,
    help="Train on the first token too (the paper's default; its norm is ~100x the rest on SmolLM2).",
)
@click.option("--demo/--no-demo", default=True, show_default=True, help="Open the demo at the end.")
@_serve_options
def run_command(
    model_ref,
    device,
    data,
    layer,
    tokens,
    arch,
    expansion,
    batch_size,
    conversations,
    cache_dir,
    keep_first_token,
    demo,
    host,
    auth,
    port,
    max_new_tokens,
    max_prompt_tokens,
) -> None:
    """The main job: train (or reuse) a FAST SAE, evaluate it, find its special-token features, open the demo."""
    from apps.jobs.main_job import MainJobConfig, build_main_backend, run_main_job

    login = _access(host, auth) if demo else None

    cfg = MainJobConfig(
        model=model_ref,
        device=device,
        data=data,
        layer=layer,
        tokens=tokens,
        arch=arch,
        expansion=expansion,
        batch_size=batch_size,
        exclude_first_token=not keep_first_token,
        eval_conversations=conversations,
        feature_conversations=conversations,
        cache=cache_dir,
    )
    job, demo_sae, sample = run_main_job(cfg, echo=click.echo)
    click.echo(
        f"[5/5] done in {job.seconds:.0f} s; SAE at {job.sae_dir}" + (" (reused)" if job.reused_sae else "")
    )
    if not demo:
        return
    backend = build_main_backend(cfg, demo_sae, sample, _limits(max_new_tokens, max_prompt_tokens))
    _start(backend, host, port, login)


def register(group: click.Group) -> None:
    group.add_command(demo_command)
    group.add_command(run_command)

"""`fast-steer serve`: an OpenAI-compatible chat server that steers each request by its own SAE spec."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from apps.cli.options import (
    config_option,
    device_map_options,
    device_option,
    model_option,
    request_limit_options,
)

if TYPE_CHECKING:
    from hub import DeviceMap

DEFAULT_PORT = 8000
LIMITS = "apps.serve.schemas:Limits"
VLLM = "apps.serve.vllm_engine:VllmOptions"


@click.command("serve")
@model_option
@click.option(
    "--sae",
    "sae_args",
    multiple=True,
    metavar="[NAME=]REF",
    help="An SAE requests may use, by NAME (default: its folder name): a folder, owner/name or "
    "owner/name:sub/folder. Repeat for several.",
)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Default spec (.json/.yaml) for requests without a `steering` field; its `sae` is a NAME or a reference.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Any other than loopback needs --api-key.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--api-key",
    envvar="FAST_STEER_API_KEY",
    default=None,
    help="Serve only requests with 'Authorization: Bearer KEY' [env FAST_STEER_API_KEY].",
)
@click.option(
    "--admin-key",
    envvar="FAST_STEER_ADMIN_KEY",
    default=None,
    help="Allow PUT /v1/steering (the default spec of every client) with 'Authorization: Bearer ADMIN_KEY' "
    "[env FAST_STEER_ADMIN_KEY]; without it, PUT /v1/steering is disabled.",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer requests whose Host header is NAME (without --api-key only 127.0.0.1, localhost and "
    "[::1] are answered). Repeat for several.",
)
@click.option("--docs", is_flag=True, help="Serve /docs, /redoc and /openapi.json.")
@click.option(
    "--served-model-name", default=None, help="The model id clients send [default: the model's name]."
)
@device_option
@device_map_options
@click.option("--dtype", default="float32", show_default=True, help="float32 | bfloat16 | float16 | auto")
@click.option(
    "--engine",
    type=click.Choice(["hf", "vllm"]),
    default="hf",
    show_default=True,
    help="hf: windowed batching over HF generate (the reference); vllm: vLLM's continuous batching and paged "
    "KV cache (needs vLLM: `make vllm-venv`, then .venv-vllm/bin/fast-steer).",
)
@config_option(
    VLLM,
    "max_num_batched_tokens",
    "--vllm-max-batched-tokens",
    type=click.IntRange(1),
    help="vllm: tokens per engine step, i.e. the prefill chunk [none: vLLM's default].",
)
@config_option(
    VLLM,
    "memory_utilization",
    "--vllm-memory-utilization",
    type=click.FloatRange(0, 1, min_open=True),
    help="vllm: share of GPU memory (on CPU, of host memory) vLLM reserves [none: 0.9 on GPU, 0.1 on CPU].",
)
@config_option(
    VLLM,
    "max_model_len",
    "--vllm-max-model-len",
    type=click.IntRange(1),
    help="vllm: positions per sequence [none: the model's context].",
)
@config_option(
    VLLM,
    "prefix_caching",
    "--vllm-prefix-caching/--no-vllm-prefix-caching",
    help="vllm: share the KV cache of common prompt prefixes (steered rows are salted by their spec).",
)
@config_option(LIMITS, "max_batch", "--max-batch", type=click.IntRange(1, 256), help="Rows per batch.")
@click.option(
    "--batch-window-ms",
    type=click.FloatRange(0, 1000),
    default=10.0,
    show_default=True,
    help="How long a batch waits for more requests after the first.",
)
@config_option(
    LIMITS, "max_queue", "--max-queue", type=click.IntRange(1), help="Waiting requests; more get 429."
)
@request_limit_options(LIMITS)
@config_option(
    LIMITS,
    "max_edits_per_spec",
    "--max-edits-per-spec",
    type=click.IntRange(1),
    help="Edits in one intervention of a request's steering.",
)
@config_option(
    LIMITS,
    "max_specs_per_request",
    "--max-specs-per-request",
    type=click.IntRange(1),
    help="Interventions in one request's steering list.",
)
@config_option(
    LIMITS,
    "max_stop_chars",
    "--max-stop-chars",
    type=click.IntRange(1),
    help="Longest stop string, in characters.",
)
@config_option(
    LIMITS,
    "max_prompts",
    "--max-prompts",
    type=click.IntRange(1),
    help="Prompts in one /v1/completions prompt list.",
)
@config_option(
    LIMITS, "max_messages", "--max-messages", type=click.IntRange(1), help="Messages in one chat request."
)
@config_option(
    LIMITS,
    "max_body_bytes",
    "--max-body-bytes",
    type=click.IntRange(1),
    help="Largest request body; a larger one gets 413.",
)
@config_option(
    LIMITS,
    "max_compiled_bytes",
    "--max-compiled-bytes",
    type=click.IntRange(1),
    help="Tensor bytes of compiled specs kept for reuse.",
)
@config_option(LIMITS, "request_timeout", "--request-timeout", type=click.FloatRange(0, min_open=True),
               help="Seconds a request may take in all (queue and generation); then 504.")  # fmt: skip
def serve_command(
    model_ref: str,
    sae_args: tuple[str, ...],
    spec_path: Path | None,
    host: str,
    port: int,
    api_key: str | None,
    admin_key: str | None,
    allow_hosts: tuple[str, ...],
    docs: bool,
    served_model_name: str | None,
    device: str,
    device_map: DeviceMap | None,
    dtype: str,
    engine: str,
    vllm_max_batched_tokens: int | None,
    vllm_memory_utilization: float | None,
    vllm_max_model_len: int | None,
    vllm_prefix_caching: bool,
    batch_window_ms: float,
    **limit_values: int | float,
) -> None:
    """Serve the OpenAI chat API (/v1/chat/completions, /v1/completions, ...) with per-request SAE steering."""
    from apps.serve.auth import check_bind
    from apps.serve.loading import default_steering, load_named_saes
    from apps.serve.schemas import Limits
    from apps.serve.server import VllmServe, make_service, serve
    from apps.serve.vllm_engine import VllmOptions, import_vllm
    from hub import load_model, resolve_device
    from steer.hooks import input_device

    check_bind(host, api_key)
    limits = Limits(**limit_values)  # every other option is a `Limits` field of the same name
    vllm = None
    if engine == "vllm":
        import_vllm()  # its clear error before anything loads
        if device_map is not None:
            raise click.UsageError("--device-map is for --engine hf; vLLM places the model itself")
    # with vLLM the model here only checks specs: its modules on the meta device, no weights read
    loaded = load_model(model_ref, dtype=dtype, device=device, device_map=device_map, weights=engine == "hf")
    if engine == "vllm":
        options = VllmOptions(
            vllm_max_batched_tokens, vllm_memory_utilization, vllm_max_model_len, vllm_prefix_caching
        )
        vllm = VllmServe(loaded.source, dtype, resolve_device(device), options)
    d_model = loaded.model.config.get_text_config().hidden_size
    # each SAE moves to the device of its layer when a spec compiles; with vLLM, read and checked on the CPU,
    # then kept here as shapes only (meta): the workers load their own copies
    home = input_device(loaded.model) if vllm is None else "cpu"
    saes = load_named_saes(list(sae_args), home, d_model)
    default = default_steering(spec_path, saes, home, d_model) if spec_path else None
    if vllm is not None:
        for s in saes:
            s.sae.to("meta")
    name = served_model_name or (Path(loaded.source).name if model_ref == "default" else model_ref)
    service = make_service(
        loaded.model,
        loaded.tokenizer,
        saes,
        model_name=name,
        limits=limits,
        window=batch_window_ms / 1000,
        api_key=api_key,
        admin_key=admin_key,
        allow_hosts=allow_hosts,
        docs=docs,
        default_steering=default,
        vllm=vllm,
    )
    for s in saes:
        click.echo(f"SAE {s.name}: layer {s.sae.layer}, {s.sae.d_in}x{s.sae.d_sae} {s.sae.cfg.architecture}")
    click.echo(
        f"serving {name!r} on http://{host}:{port}/v1 (default steering: {service.steering.describe_default()})"
    )
    serve(service, host, port)


def register(group: click.Group) -> None:
    group.add_command(serve_command)

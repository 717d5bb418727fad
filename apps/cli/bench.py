"""`fast-steer bench ...`: speed benchmarks that print JSON. Parts register themselves on `bench_group`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click

from apps.bench import eval as eval_bench
from apps.bench import gpu as gpu_bench
from apps.bench import interp as interp_bench
from apps.bench import serve as serve_bench
from apps.bench import soak as soak_bench
from apps.bench import steer as steer_bench
from apps.bench import train as train_bench
from apps.cli.options import Numbers, config_device_option, config_option, device_option, stack


@click.group("bench")
def bench_group() -> None:
    """Speed benchmarks (JSON on stdout; ratios measured within one run)."""


@bench_group.command("all")
@click.pass_context
def bench_all(ctx: click.Context) -> None:
    """Run every benchmark part with its defaults, one after the other."""
    for name, command in sorted(bench_group.commands.items()):
        if name not in ("all", "gpu"):  # gpu: the acceptance kit, for a GPU machine with its carried folder
            click.echo(f"# bench {name}", err=True)
            ctx.invoke(command)


STEER = steer_bench.BenchConfig
SERVE = serve_bench.BenchServeConfig
SOAK = soak_bench.SoakConfig
# the options of bench serve without --soak
SERVE_ONLY = ("requests_per_client", "repeats", "concurrency", "engine", "vllm_python")
SOAK_ONLY = ("requests", "clients", "max_seconds", "compared", "seed")
DEFAULT_SOURCES = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


def _model_bench_options(config: type) -> Callable:
    """The options of every `ModelBenchConfig`: model, dtype, device, steered layer, SAE width."""
    return stack(
        config_option(config, "model", "--model", help="Model reference."),
        config_option(config, "dtype", "--dtype"),
        config_device_option(config),
        config_option(config, "layer", "--layer", type=click.IntRange(0), help="Steered layer (default: the middle layer)."),
        config_option(config, "d_sae", "--d-sae", type=click.IntRange(1), help="Width of the random SAE."),
    )  # fmt: skip


@bench_group.command("steer")
@_model_bench_options(STEER)
@config_option(STEER, "topk", "--topk", type=int, help="k of the TopK SAE (full-SAE case).")
@config_option(STEER, "new_tokens", "--new-tokens", type=int)
@config_option(STEER, "repeats", "--repeats", type=int)
@config_option(STEER, "batch_sizes", "--batch-sizes", type=Numbers(int), help="Comma-separated batch sizes.")
def bench_steer_command(**options) -> None:
    """Tokens/s of plain vs steered generate (JSON on stdout)."""
    if options["repeats"] < 1 or min(options["batch_sizes"]) < 1:
        raise click.BadParameter("--repeats and batch sizes must be positive")
    if options["new_tokens"] < 2:
        raise click.BadParameter("--new-tokens must be at least 2 (the first forward is the prefill)")
    click.echo(json.dumps(steer_bench.run_bench(steer_bench.BenchConfig(**options)), indent=2))


@bench_group.command("serve")
@_model_bench_options(SERVE)
@config_option(
    SERVE, "new_tokens", "--new-tokens", type=click.IntRange(1), help="Per request (--soak: at most)."
)
@config_option(SERVE, "requests_per_client", "--requests-per-client", type=click.IntRange(1))
@config_option(SERVE, "repeats", "--repeats", type=click.IntRange(1))
@config_option(
    SERVE, "concurrency", "--concurrency", type=Numbers(int), help="Comma-separated client counts."
)
@config_option(SERVE, "window_ms", "--window-ms", type=click.FloatRange(0), help="Batch window.")
@config_option(SERVE, "engine", "--engine", type=click.Choice(tuple(serve_bench.ENGINES)),
               help="The server's engine; both: interleaved, with vLLM ÷ HF tokens/s.")  # fmt: skip
@config_option(SERVE, "vllm_python", "--vllm-python", type=click.Path(dir_okay=False),
               help="Python of the vLLM environment [default: .venv-vllm/bin/python of this checkout].")  # fmt: skip
@click.option("--soak", is_flag=True, help="The load and fault test instead, with the --soak options below.")
@config_option(SOAK, "requests", "--requests", type=click.IntRange(1), help="--soak: requests sent.")
@config_option(SOAK, "clients", "--clients", type=click.IntRange(1), help="--soak: concurrent clients.")
@config_option(SOAK, "max_seconds", "--max-seconds", type=click.FloatRange(0, min_open=True),
               help="--soak: no request is sent after this many seconds.")  # fmt: skip
@config_option(
    SOAK, "compared", "--compared", type=click.IntRange(0), help="--soak: greedy replies re-run alone."
)
@config_option(SOAK, "seed", "--seed", type=int, help="--soak: seed of the request plan.")
@click.pass_context
def bench_serve_command(ctx: click.Context, soak: bool, **options) -> None:
    """Tokens/s and latency of the server, mixed steered/plain vs plain, batched vs one at a time (JSON).
    With --soak: answers by class, faults, greedy replies vs alone, memory growth and latency under load."""
    other = SERVE_ONLY if soak else SOAK_ONLY
    given = [n for n in other if ctx.get_parameter_source(n) not in (None, *DEFAULT_SOURCES)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise click.UsageError(
            f"{flags}: not an option of bench serve {'--soak' if soak else 'without --soak'}"
        )
    if soak:
        if options["new_tokens"] < 2:
            raise click.BadParameter("at least 2 with --soak (its dropped streams go after the first chunk)",
                                     param_hint="--new-tokens")  # fmt: skip
        cfg = SOAK(**{k: v for k, v in options.items() if k not in SERVE_ONLY})
        click.echo(json.dumps(soak_bench.run_soak(cfg), indent=2))
        return
    if min(options["concurrency"]) < 1:
        raise click.BadParameter("client counts must be positive", param_hint="--concurrency")
    if options["vllm_python"] is not None and options["engine"] == "hf":
        raise click.UsageError("--vllm-python is for --engine vllm or both")
    cfg = SERVE(**{k: v for k, v in options.items() if k not in SOAK_ONLY})
    click.echo(json.dumps(serve_bench.run_bench(cfg), indent=2))


@bench_group.command("train")
@click.option("--model", "model_ref", default="default", show_default=True)
@click.option("--data", multiple=True, default=("../shared/data/chat",), show_default=True)
@click.option("--layer", type=int, default=15, show_default=True)
@click.option("--expansion", type=int, default=8, show_default=True)
@click.option("--batch-size", type=int, default=1024, show_default=True)
@click.option("--tokens", type=int, default=16384, show_default=True, help="Tokens trained end to end.")
@click.option(
    "--buffer-tokens", type=int, default=4096, show_default=True, help="Mixing buffer (small: short runs)."
)
@click.option(
    "--repeats",
    type=int,
    default=2,
    show_default=True,
    help="Repeats of every measurement, whole end-to-end runs included (medians).",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Model dtype for harvesting (auto: bfloat16 on CUDA / AMX CPUs, else float32).",
)
@click.option(
    "--autocast/--no-autocast",
    default=None,
    help="bf16 autocast for the SAE step (default: the trainer's, where bf16 matmuls are native; "
    "--vs-saelens: both settings).",
)
@device_option
@click.option(
    "--vs-saelens",
    is_flag=True,
    help="Both tools, with and without autocast, each SAELens run right after ours in the same setting "
    "(SAELens 6.54 in .venv-saelens).",
)
@click.option(
    "--compile/--no-compile",
    default=None,
    help="Our harvesting forward torch.compile'd (each end-to-end run compiles, from Inductor's disk cache); "
    "SAELens both without and with compile_llm and compile_sae (its best of either).  [default: as train: on a "
    "CPU with a C++ compiler, for 64k tokens or more]",
)
def bench_train(model_ref, data, layer, expansion, batch_size, tokens, buffer_tokens, repeats, dtype, autocast,
                device, vs_saelens, compile) -> None:  # fmt: skip
    """Harvesting and end-to-end training throughput vs. the sequential limit (JSON)."""
    if min(batch_size, tokens, buffer_tokens, repeats) < 1:
        raise click.BadParameter("--batch-size, --tokens, --buffer-tokens and --repeats must be positive")
    # --vs-saelens: SAELens's whole runs (start-up included), same model, layer, SAE, batch and token budget,
    # in both settings, each right after ours
    out = train_bench.run_bench(model_ref, list(data), layer, expansion, batch_size, tokens, buffer_tokens, repeats,
                    autocast, dtype, device, vs_saelens=vs_saelens, compile=compile)  # fmt: skip
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


@bench_group.command("eval")
@click.option("--model", "model_ref", default="default", show_default=True, help="Model reference.")
@device_option
@click.option("--dtype", default="float32", show_default=True, help="Model dtype (auto: bfloat16 on CUDA).")
@click.option("--data", multiple=True, default=("../shared/data/chat",), show_default=True)
@click.option("--layer", type=int, help="Layer the SAE reads (default: the middle layer).")
@click.option("--conversations", type=int, default=48, show_default=True, help="Conversations evaluated.")
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--expansion", type=int, default=8, show_default=True, help="Random SAE width / model width.")
def bench_eval(model_ref, device, dtype, data, layer, conversations, repeats, expansion) -> None:
    """Evaluation tokens/s (with the delta LM loss) vs two bare full forwards (JSON)."""
    if min(conversations, repeats, expansion) < 1:
        raise click.BadParameter("--conversations, --repeats and --expansion must be positive")
    out = eval_bench.run_bench(model_ref, device, dtype, list(data), layer, conversations, repeats, expansion)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


INTERP = interp_bench.BenchInterpConfig


@bench_group.command("interp")
@config_option(INTERP, "model", "--model", help="Model reference.")
@config_option(INTERP, "data", "--data", multiple=True, help="Conversations (JSONL files or folders).")
@config_option(INTERP, "conversations", "--conversations", type=click.IntRange(1))
@config_option(INTERP, "layer", "--layer", type=click.IntRange(0), help="Default: the middle layer.")
@config_option(INTERP, "expansion", "--expansion", type=click.IntRange(1), help="SAE width / model width.")
@config_option(INTERP, "l0", "--l0", type=click.FloatRange(0, min_open=True), help="Mean L0 of the SAE.")
@config_option(INTERP, "dtype", "--dtype")
@config_device_option(INTERP)
@config_option(INTERP, "repeats", "--repeats", type=click.IntRange(1))
@config_option(INTERP, "judge_requests", "--judge-requests", type=click.IntRange(1))
@config_option(
    INTERP, "judge_concurrency", "--judge-concurrency", type=Numbers(int), help="Comma-separated limits."
)
@config_option(
    INTERP, "judge_delay_ms", "--judge-delay-ms", type=click.FloatRange(0), help="Fake judge delay."
)
def bench_interp_command(**options) -> None:
    """Collection vs harvest tokens/s, and judge requests in flight vs the limit (JSON)."""
    if min(options["judge_concurrency"], default=0) < 1:
        raise click.BadParameter("limits must be positive integers", param_hint="--judge-concurrency")
    options["data"] = tuple(options["data"])
    click.echo(json.dumps(interp_bench.run_bench(INTERP(**options)), indent=2))


GPU = gpu_bench.GpuCheckConfig


@bench_group.command("gpu")
@config_option(GPU, "device", "--device", help="Where the models run (cpu with --tiny: the dry run).")
@config_option(GPU, "tiny", "--tiny", is_flag=True, help="Tiny shapes and few tokens (the kit's dry run).")
@config_option(GPU, "carry", "--carry", help="The carried folder (make gpu-carry).")
@config_option(GPU, "out", "--out", help="Folder for gpu_check.json and the stage logs.")
@config_option(
    GPU, "deadline_s", "--deadline", "deadline_s", type=click.FloatRange(10), help="Seconds for all stages."
)
def bench_gpu_command(**options) -> None:
    """The GPU acceptance kit: CUDA tests, bench train on the 8B shape, bench steer (JSON in --out)."""
    report = gpu_bench.run_check(GPU(**options))
    click.echo(json.dumps(report["summary"], indent=2))


def register(group: click.Group) -> None:
    group.add_command(bench_group)

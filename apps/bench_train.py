"""`fast-steer bench train`: FAST harvesting and end-to-end SAE training against the sequential limit.

Measured in one run on the same conversations (JSON on stdout):
- bare bf16 forward to layer L and FAST harvesting (interleaved repeats, medians; padding share);
- the bare SAE step (the trainer's own step on pre-harvested activations, interleaved repeats);
- the sequential limit `1 / (1/forward + 1/SAE step)`;
- end-to-end training (ActivationStream -> SAETrainer.fit) in steady state: tokens trained between the first
  and the last batch handed out, over that time (the first buffer fill is start-up, not throughput);
- peak memory against model + SAEs + optimiser + gradients + buffer + one step's activations;
- `--vs-saelens`: SAELens 6.54 (in `.venv-saelens`, `make saelens-venv`) on the same model, layer, SAE size,
  batch and token budget, and the ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

SAELENS_PYTHON = Path(".venv-saelens/bin/python")
SAELENS_SCRIPT = Path(__file__).with_name("saelens_train_bench.py")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _TimedStream:
    """Wraps a stream and records when each batch was handed out."""

    def __init__(self, stream) -> None:
        self.stream, self.times = stream, []

    def __iter__(self):
        return self

    def __next__(self):
        x = next(self.stream)
        self.times.append(time.perf_counter())
        return x


def _sae_step_rate(trainer, xs, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in xs:
            trainer.train_step(x)
        rates.append(sum(len(x) for x in xs) / (time.perf_counter() - t0))
    return rates


def run_bench(model_ref: str, data: list[str], layer: int, expansion: int, batch_size: int, tokens: int,
              buffer_tokens: int, repeats: int, autocast: bool) -> dict:  # fmt: skip
    """All measurements of `fast-steer bench train` (without SAELens)."""
    import torch

    from hub import load_model
    from train.activations import ActivationStream, StreamConfig, context_length
    from train.config import SAETrainSpec, TrainConfig
    from train.data import load_conversations
    from train.harvest import Harvester, harvest_throughput
    from train.sequences import bucket_batches, fast_sequences
    from train.trainer import SAETrainer, peak_memory_mib

    base_rss = _rss_mib()
    loaded = load_model(model_ref, dtype="bfloat16")
    model, tok = loaded
    corpus = load_conversations(data, split="train")
    # enough conversations for `tokens` real tokens (~4 chars per token)
    convs, chars = [], 0
    for conv in corpus:
        convs.append(conv)
        chars += sum(len(m["content"]) for m in conv)
        if chars > 6 * tokens:
            break
    max_len = min(8192, context_length(model) or 8192)
    seqs = fast_sequences(convs, tok, max_len=max_len)
    batches, real = [], 0
    for b in bucket_batches(seqs, 8192, tok.pad_token_id, seed=0):
        batches.append(b)
        real += b.n_tokens
        if real >= tokens:
            break
    fwd = harvest_throughput(model, batches, layer, repeats=repeats)

    cfg = TrainConfig(total_tokens=tokens, batch_size=batch_size, saes=[SAETrainSpec(expansion=expansion)],
                      checkpoint_every=0, log_every=10**9, autocast=autocast)  # fmt: skip
    harvester = Harvester(model, layer)
    acts = torch.cat([harvester(b) for b in batches])
    xs = [acts[i : i + batch_size] for i in range(0, len(acts) - batch_size + 1, batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        step_trainer = SAETrainer(cfg, acts.shape[1], tmp, progress=False)
        step_trainer.init_from_first_batch(xs[0])
        sae_rates = _sae_step_rate(step_trainer, xs, repeats)
        del step_trainer
        stream = _TimedStream(
            ActivationStream(
                model,
                tok,
                corpus,
                StreamConfig(
                    layer=layer, batch_size=batch_size, buffer_tokens=buffer_tokens, max_len=max_len
                ),
            )  # fmt: skip
        )
        trainer = SAETrainer(cfg, acts.shape[1], Path(tmp) / "e2e", progress=False)
        result = trainer.fit(stream)
    n = len(stream.times)
    e2e = (n - 1) * batch_size / (stream.times[-1] - stream.times[0]) if n > 1 else float("nan")
    sae_rate = statistics.median(sae_rates)
    limit = 1.0 / (1.0 / fwd["bare_tokens_per_s"] + 1.0 / sae_rate)
    d_sae = acts.shape[1] * expansion
    inter = model.config.get_text_config().intermediate_size
    mib = 2**20
    est = {
        "runtime_baseline": base_rss,
        "model": sum(p.numel() * p.element_size() for p in model.parameters()) / mib,
        "saes_params_grads_adam": 4 * (2 * d_sae * acts.shape[1] + d_sae + acts.shape[1]) * 4 / mib,
        "buffer": buffer_tokens * acts.shape[1] * 4 * 1.5 / mib,  # store + pending refill
        "step_activations": 4 * batch_size * d_sae * 4 / mib,  # feature acts + 3 gradients of [batch, d_sae]
        # one bf16 harvesting forward of 8192 padded tokens: residual, attention and MLP transients
        "lm_forward": 8192 * (4 * acts.shape[1] + 3 * inter) * 2 / mib,
        "bench_activations": acts.numel() * 4 / mib,
    }
    estimate = sum(est.values())
    peak = peak_memory_mib()
    return {
        "model": model_ref,
        "layer": layer,
        "sae": f"{acts.shape[1]}x{d_sae}",
        "batch_size": batch_size,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "sae_autocast_bf16": autocast,
        "bare_forward_tokens_per_s": fwd["bare_tokens_per_s"],
        "harvest_tokens_per_s": fwd["harvest_tokens_per_s"],
        "harvest_ratio": fwd["ratio"],
        "padding_share": fwd["padding_share"],
        "bare_sae_step_tokens_per_s": sae_rate,
        "sequential_limit_tokens_per_s": limit,
        "end_to_end_tokens_per_s": e2e,
        "end_to_end_ratio_to_limit": e2e / limit,
        "end_to_end_tokens_trained": result.tokens,
        "end_to_end_whole_run_tokens_per_s": result.tokens_per_s,  # incl. the first buffer fill
        "peak_memory_mib": peak,
        "memory_estimate_mib": estimate,
        "memory_estimate_parts_mib": est,
        "peak_over_estimate": peak / estimate,
        "repeats": repeats,
    }


def run_saelens(model_dir: Path, data: list[str], layer: int, expansion: int, batch_size: int, tokens: int,
                autocast: bool) -> dict:  # fmt: skip
    """SAELens training throughput in its own venv (a subprocess printing one JSON line)."""
    if not SAELENS_PYTHON.is_file():
        raise click.ClickException(f"{SAELENS_PYTHON} not found: run `make saelens-venv` first")
    cmd = [str(SAELENS_PYTHON), str(SAELENS_SCRIPT), "--model-dir", str(model_dir), "--layer", str(layer),
           "--expansion", str(expansion), "--batch-size", str(batch_size), "--tokens", str(tokens),
           *(["--autocast"] if autocast else []), *[a for d in data for a in ("--data", d)]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise click.ClickException(f"SAELens benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@click.command("train")
@click.option("--model", "model_ref", default="default", show_default=True)
@click.option("--data", multiple=True, default=("../shared/data/chat",), show_default=True)
@click.option("--layer", type=int, default=15, show_default=True)
@click.option("--expansion", type=int, default=8, show_default=True)
@click.option("--batch-size", type=int, default=4096, show_default=True)
@click.option("--tokens", type=int, default=65536, show_default=True, help="Tokens per measurement.")
@click.option("--buffer-tokens", type=int, default=16384, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--autocast", is_flag=True, help="bf16 autocast for the SAE step (and SAELens).")
@click.option("--vs-saelens", is_flag=True, help="Also train with SAELens 6.54 (.venv-saelens) and compare.")
def bench_train(model_ref, data, layer, expansion, batch_size, tokens, buffer_tokens, repeats, autocast,
                vs_saelens) -> None:  # fmt: skip
    """Harvesting and end-to-end training throughput vs. the sequential limit (JSON)."""
    out = run_bench(
        model_ref, list(data), layer, expansion, batch_size, tokens, buffer_tokens, repeats, autocast
    )
    if vs_saelens:
        from hub import load_model

        model_dir = Path(load_model(model_ref).source)
        sl = run_saelens(model_dir, list(data), layer, expansion, batch_size, tokens, autocast)
        out["saelens"] = sl
        # both whole runs (start-up included), same model, layer, SAE, batch and token budget
        out["end_to_end_over_saelens"] = out["end_to_end_whole_run_tokens_per_s"] / sl["tokens_per_s"]
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


def register(group: click.Group) -> None:
    from apps.cli_bench import bench_group

    bench_group.add_command(bench_train)

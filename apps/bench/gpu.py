"""`fast-steer bench gpu`: the GPU acceptance kit (`make gpu-check` on a bare GPU machine).

Stages, each in its own process with a time budget (a stage that fails or runs out of time records its error,
and the next one still runs), all under one deadline:
1. `cuda_tests`: the tests that need CUDA (they skip without it and have `cuda` in their name), under pytest;
2. `train_8b`: `bench train` at layer 18 of a random Llama-3.1-8B-shaped model in bfloat16 (FAST harvesting +
   SAE training end to end, its ratio to the sequential limit, peak GPU memory against the estimate);
3. `steer_8b`, `steer_1b`: `bench steer` (steered / plain decode) at batch 1, 8 and 32 on the 8B and 1B shapes.
The models are random (speed does not depend on the weights) with the carried SmolLM2 tokenizer; the data is
the carried chat subset (`apps.bench.gpu_carry`). `--tiny` runs the same stages on tiny shapes and few tokens:
the CPU dry run of the test suite. Every figure goes to `<out>/gpu_check.json` (rewritten after each stage),
with each stage's log beside it, and a summary of the targets.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from apps.bench.gpu_carry import CHAT, TOKENIZER

REPO = Path(__file__).resolve().parents[2]
RESULT_FILE = "gpu_check.json"
LLAMA_VOCAB = 128256
SHAPES: dict[str, dict[str, int]] = {
    "llama-3.2-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": LLAMA_VOCAB},
    "llama-3.1-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": LLAMA_VOCAB},
    # the dry run's: the vocabulary is the tokenizer's own
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128},
}  # fmt: skip
# on one H100/H200: name -> (comparison, bound); read from the stages marked `targets`
TARGETS: dict[str, tuple[str, float]] = {
    "end_to_end_tokens_per_s": (">=", 25_000.0),  # FAST harvest + training, 8B shape
    "peak_over_estimate": ("<=", 1.3),  # peak GPU memory of that run / its estimate
    "steered_over_plain_decode_batch_32": (">=", 0.98),  # the worst case of bench steer, 8B shape
}
STEER_BATCHES = (1, 8, 32)


@dataclass
class GpuCheckConfig:
    """`fast-steer bench gpu`."""

    device: str = "cuda"
    """Where the models run."""
    tiny: bool = False
    """Tiny shapes and few tokens (the CPU dry run of the kit itself)."""
    carry: str = "gpu-carry"
    """The carried folder (`make gpu-carry`): tokenizer/ and chat/."""
    out: str = "gpu-out"
    """Folder for gpu_check.json and the stage logs."""
    deadline_s: float = 420.0
    """Wall-clock seconds for all stages together."""


@dataclass(frozen=True)
class Stage:
    """One stage: what it runs (`tests`, `train` or `steer`), on which shape, its budget and settings."""

    name: str
    kind: str
    budget_s: float
    shape: str = ""
    settings: dict = field(default_factory=dict)
    targets: bool = False  # the summary reads this stage's figures


TRAIN = {"layer": 18, "expansion": 8, "batch_size": 4096, "tokens": 2**19, "buffer_tokens": 2**17, "repeats": 1,
         "autocast": True}  # fmt: skip
TINY_TRAIN = {"layer": 2, "expansion": 2, "batch_size": 64, "tokens": 512, "buffer_tokens": 256, "repeats": 1,
              "autocast": False}  # fmt: skip
STEER = {"topk": 64, "new_tokens": 16, "repeats": 5}
TINY_STEER = {"d_sae": 128, "topk": 8, "new_tokens": 3, "repeats": 1}


def plan(tiny: bool) -> list[Stage]:
    """The stages in run order: real shapes, or the dry run's tiny ones."""
    if tiny:
        return [
            Stage("cuda_tests", "tests", 120),
            Stage("train_tiny", "train", 120, "tiny", TINY_TRAIN, targets=True),
            Stage("steer_tiny", "steer", 60, "tiny", TINY_STEER, targets=True),
        ]
    return [
        Stage("cuda_tests", "tests", 100),
        Stage("train_8b", "train", 170, "llama-3.1-8b", TRAIN, targets=True),
        Stage("steer_8b", "steer", 90, "llama-3.1-8b", {**STEER, "d_sae": 32768}, targets=True),
        Stage("steer_1b", "steer", 60, "llama-3.2-1b", {**STEER, "d_sae": 16384}),
    ]


def run_check(cfg: GpuCheckConfig) -> dict:
    """Run every stage (each in its own process, within its budget and the deadline); returns the report."""
    cfg = replace(cfg, carry=str(Path(cfg.carry).resolve()), out=str(Path(cfg.out).resolve()))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict = {"config": asdict(cfg), "environment": environment(cfg.device), "stages": {}}
    for stage in plan(cfg.tiny):
        left = cfg.deadline_s - (time.perf_counter() - start)
        if left < 5:
            report["stages"][stage.name] = {"ok": False, "error": "not run: the deadline was reached"}
        else:
            report["stages"][stage.name] = _run_stage(stage, cfg, out, min(stage.budget_s, left))
        report["summary"] = summarise(report["stages"], plan(cfg.tiny))
        report["seconds"] = time.perf_counter() - start
        (out / RESULT_FILE).write_text(json.dumps(report, indent=2))
    return report


def environment(device: str) -> dict:
    """Versions and the accelerator, as this process sees them."""
    import torch
    import transformers

    from hub.model import library_versions

    env = {"python": platform.python_version(), **library_versions(),
           "transformers_from": str(Path(transformers.__file__).parent), "cuda_available": torch.cuda.is_available()}  # fmt: skip
    if device.startswith("cuda") and torch.cuda.is_available():
        env |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30}  # fmt: skip
    return env


def _run_stage(stage: Stage, cfg: GpuCheckConfig, out: Path, timeout: float) -> dict:
    """One stage in a child process; its output goes to `<out>/<stage>.log`, its figures come back as JSON."""
    log = out / f"{stage.name}.log"
    result_path = out / f"{stage.name}.json"
    result_path.unlink(missing_ok=True)
    if stage.kind == "tests":
        cmd = [sys.executable, "-m", "pytest", *map(str, cuda_test_files()), "-k", "cuda", "-q", "-rfEs",
               "-p", "no:cacheprovider", f"--junitxml={result_path.with_suffix('.xml')}"]  # fmt: skip
    else:
        spec = out / f"{stage.name}.stage.json"
        spec.write_text(
            json.dumps({"stage": asdict(stage), "config": asdict(cfg), "result": str(result_path)})
        )
        cmd = [sys.executable, "-m", "apps.bench.gpu", "--stage", str(spec)]
    t0 = time.perf_counter()
    try:
        with open(log, "w", encoding="utf-8") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": f"timed out after {timeout:.0f} s"}
    record = {"seconds": time.perf_counter() - t0, "returncode": proc.returncode}
    if stage.kind == "tests":
        record["result"] = junit_counts(result_path.with_suffix(".xml"))
        record["ok"] = proc.returncode == 0 and record["result"]["tests"] > 0
    else:
        record["ok"] = proc.returncode == 0 and result_path.is_file()
        if record["ok"]:
            record["result"] = json.loads(result_path.read_text())
    if not record["ok"]:
        record["error"] = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    return record


def cuda_test_files(root: Path = REPO / "tests") -> list[Path]:
    """Test files with tests that skip without CUDA (`torch.cuda.is_available()` in their text)."""
    return sorted(p for p in root.rglob("test_*.py") if "torch.cuda.is_available()" in p.read_text("utf-8"))


def junit_counts(path: Path) -> dict:
    """Tests, passed, failed, errors, skipped (and the names of the failed ones) from a pytest JUnit XML."""
    if not path.is_file():
        return {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    cases = ET.parse(path).getroot().iter("testcase")
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_tests": []}
    for case in cases:
        counts["tests"] += 1
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is not None:
            counts[{"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome]] += 1
        if outcome in ("failure", "error"):
            counts["failed_tests"].append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def summarise(stages: dict, planned: list[Stage]) -> dict:
    """Each target: its value (None when its stage gave none), the bound, and whether it is met."""
    figures: dict[str, float | None] = {}
    for stage in planned:
        result = stages.get(stage.name, {}).get("result")
        if stage.targets and stage.kind == "train":
            figures["end_to_end_tokens_per_s"] = result and result["end_to_end_tokens_per_s"]
            figures["peak_over_estimate"] = result and result["peak_over_estimate"]
        elif stage.targets and stage.kind == "steer":
            figures["steered_over_plain_decode_batch_32"] = result and min(
                case["ratio"] for case in result["results"]["batch_32"].values() if "ratio" in case
            )
    summary = {}
    for name, (op, bound) in TARGETS.items():
        value = figures.get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        summary[name] = {"value": value, "target": f"{op} {bound:g}", "pass": met}
    tests = stages.get("cuda_tests", {}).get("result") or {}
    ran_all = bool(tests.get("passed")) and tests.get("skipped") == 0  # skipped: CUDA was not there
    summary["cuda_tests"] = {"value": tests.get("passed"), "failed": tests.get("failed"), "target": "all pass",
                             "pass": bool(stages.get("cuda_tests", {}).get("ok")) and ran_all}  # fmt: skip
    return summary


# -- the child process of a model stage -----------------------------------------------------------
def build_model(shape: str, tokenizer_dir: Path, device: str, dtype: str):
    """A random-weight Llama of `shape` in `dtype` on `device`, with the carried tokenizer (`LoadedModel`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from hub import LoadedModel
    from steer.errors import ConfigError
    from steer.sae import dtype_from_name

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dims = {"vocab_size": len(tokenizer), **SHAPES[shape]}
    if len(tokenizer) > dims["vocab_size"]:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, more than the {shape} vocabulary")
    config = LlamaConfig(**dims, max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype_from_name(dtype)).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=f"random {shape}", ref=shape)


def run_stage(stage: Stage, cfg: GpuCheckConfig) -> dict:
    """A model stage's figures: `bench train` or `bench steer` on a random model of the stage's shape."""
    from apps.bench import steer as steer_bench
    from apps.bench import train as train_bench

    dtype = "float32" if cfg.tiny else "bfloat16"
    carry = Path(cfg.carry)
    loaded = build_model(stage.shape, carry / TOKENIZER, cfg.device, dtype)
    s = stage.settings
    if stage.kind == "train":
        return train_bench.run_bench(stage.shape, [str(carry / CHAT)], s["layer"], s["expansion"], s["batch_size"],
                                     s["tokens"], s["buffer_tokens"], s["repeats"], s["autocast"], dtype,
                                     cfg.device, loaded=loaded, with_cache=False)  # fmt: skip
    bench = steer_bench.BenchConfig(model=stage.shape, dtype=dtype, device=cfg.device, d_sae=s["d_sae"],
                                    topk=s["topk"], new_tokens=s["new_tokens"], repeats=s["repeats"],
                                    batch_sizes=STEER_BATCHES)  # fmt: skip
    return steer_bench.run_bench(bench, loaded=loaded)


def _stage_main(spec_path: str) -> int:
    """A child process: run the stage of the spec file, write its figures where the spec says."""
    spec = json.loads(Path(spec_path).read_text())
    stage, cfg = Stage(**spec["stage"]), GpuCheckConfig(**spec["config"])
    try:
        result = run_stage(stage, cfg)
    except Exception:  # the parent records the log's tail as the stage's error
        traceback.print_exc()
        return 1
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str]) -> int:
    """`python -m apps.bench.gpu [--device cuda] [--tiny] ...`: the kit on a bare machine, where the full CLI
    (`fast-steer bench gpu`, same options from `GpuCheckConfig`) cannot load: it imports every app's extras."""
    if argv[:1] == ["--stage"]:
        return _stage_main(argv[1])
    parser = argparse.ArgumentParser(prog="python -m apps.bench.gpu", description=__doc__.splitlines()[0])
    for f in fields(GpuCheckConfig):
        flag = "--" + f.name.removesuffix("_s").replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true")
        else:
            parser.add_argument(
                flag, dest=f.name, type=float if f.type == "float" else str, default=f.default
            )
    report = run_check(GpuCheckConfig(**vars(parser.parse_args(argv))))
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

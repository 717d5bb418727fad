"""The GPU acceptance kit: the carried folder's builder, and the whole kit's CPU dry run on tiny shapes."""

from __future__ import annotations

import json
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from packaging.requirements import Requirement
from transformers import AutoTokenizer

from apps.bench import gpu
from apps.bench.gpu_carry import CARRIED_PACKAGES, CHAT, TOKENIZER, build_carry
from apps.cli import main
from steer.errors import FastSteerError
from tests.conftest import CHAT_DATA

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def carry(tmp_path_factory, chatml_tokenizer) -> Path:
    """A carried folder without wheels: the tiny ChatML tokenizer and 0.5 MB of the shared chat data."""
    root = tmp_path_factory.mktemp("gpu")
    chatml_tokenizer.save_pretrained(root / "source")
    build_carry(root / "carry", root / "source", CHAT_DATA, constraints=None, data_mib=0.5)
    return root / "carry"


def _name(text: str) -> str:
    return text.lower().replace("_", "-")


def test_carry_holds_the_tokenizer_and_whole_conversations(carry, chatml_tokenizer):
    assert len(AutoTokenizer.from_pretrained(carry / TOKENIZER)) == len(chatml_tokenizer)
    files = sorted((carry / CHAT).glob("*.jsonl"))
    assert [f.name for f in files] == sorted(f.name for f in CHAT_DATA.glob("*.jsonl"))
    assert 0.4 * 2**20 < sum(f.stat().st_size for f in files) <= 0.5 * 2**20
    for f in files:
        text = f.read_text()
        assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())


def test_carry_over_the_limit_is_refused(tmp_path, carry):
    with pytest.raises(FastSteerError, match=r"holds 0\.\d MiB, more than the 0.01 MiB that can be carried"):
        build_carry(tmp_path / "c", carry / TOKENIZER, CHAT_DATA, None, data_mib=0.2, limit_mib=0.01)


def test_carried_wheels_cover_the_runtime_dependencies():
    """Every distribution our runtime needs (pyproject's dependencies, accelerate, pytest), transitively, is
    carried, except torch and its own dependencies and numpy (on every machine that has torch + transformers)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    top = [Requirement(r).name for r in project["dependencies"]] + ["accelerate", "pytest", "pytest-timeout"]

    def closure(names: list[str]) -> set[str]:
        seen: set[str] = set()
        while names:
            name = _name(names.pop())
            if name not in seen:
                seen.add(name)
                for text in metadata.requires(name) or []:
                    req = Requirement(text)
                    if req.marker is None or req.marker.evaluate({"extra": ""}):
                        names.append(req.name)
        return seen

    needed = closure(top) - closure(["torch"]) - {"numpy"}
    assert needed - {_name(p) for p in CARRIED_PACKAGES} == set()


def test_cpu_dry_run_writes_every_figure(carry, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main, ["bench", "gpu", "--device", "cpu", "--tiny", "--carry", str(carry), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / gpu.RESULT_FILE).read_text())
    assert json.loads(res.output) == report["summary"]
    assert list(report["stages"]) == [s.name for s in gpu.plan(tiny=True)]
    assert all(stage["ok"] for stage in report["stages"].values()), report["stages"]
    assert report["environment"]["torch"] == torch.__version__

    tests = report["stages"]["cuda_tests"]["result"]
    assert tests["tests"] > 0 and tests["failed"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"] and report["summary"]["cuda_tests"]["pass"] is False

    train = report["stages"]["train_tiny"]["result"]
    for key in ("end_to_end_tokens_per_s", "end_to_end_ratio_to_limit", "harvest_tokens_per_s", "peak_memory_mib",
                "memory_estimate_mib", "peak_over_estimate"):  # fmt: skip
        assert train[key] > 0, key
    steer = report["stages"]["steer_tiny"]["result"]["results"]
    assert list(steer) == [f"batch_{b}" for b in gpu.STEER_BATCHES]
    assert all(case["decode_tokens_per_s"] > 0 for batch in steer.values() for case in batch.values())

    assert set(report["summary"]) == {*gpu.TARGETS, "cuda_tests"}
    for name in gpu.TARGETS:
        entry = report["summary"][name]
        assert entry["value"] > 0 and isinstance(entry["pass"], bool), name


def test_a_failing_stage_records_its_error(tmp_path):
    cfg = gpu.GpuCheckConfig(device="cpu", tiny=True, carry=str(tmp_path / "missing"), out=str(tmp_path))
    stage = gpu.plan(tiny=True)[1]
    record = gpu._run_stage(stage, cfg, tmp_path, timeout=120)
    assert record["ok"] is False and "missing" in record["error"] and "Traceback" in record["error"]
    summary = gpu.summarise({stage.name: record}, [stage])
    assert summary["end_to_end_tokens_per_s"] == {"value": None, "target": ">= 25000", "pass": None}


def test_the_deadline_stops_stages_from_starting(tmp_path):
    report = gpu.run_check(gpu.GpuCheckConfig(device="cpu", tiny=True, out=str(tmp_path), deadline_s=1))
    assert {s["error"] for s in report["stages"].values()} == {"not run: the deadline was reached"}
    assert json.loads((tmp_path / gpu.RESULT_FILE).read_text())["stages"] == report["stages"]

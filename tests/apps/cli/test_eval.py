"""`fast-steer eval` on a tiny model and a saved random SAE: `--split held-out|all`, the line that says how
many of how many conversations were used, the cap, the device, and the counts in eval.json."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from apps.cli import main
from hub import save_sae
from steer.sae import SAEConfig, build_sae
from tests.conftest import read_conversations, save_tiny_model
from train.data import is_held_out

N_CONVERSATIONS = 150
FRACTION = 0.05


@pytest.fixture(scope="module")
def setup(tmp_path_factory, chatml_tokenizer):
    """A tiny Llama folder, a JSONL of 150 conversations and an SAE folder reading its layer 1."""
    root = tmp_path_factory.mktemp("eval")
    save_tiny_model(root / "model", chatml_tokenizer)
    convs = read_conversations("taskmaster4_coffee.jsonl", N_CONVERSATIONS)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    torch.manual_seed(0)
    meta = {
        "hook_name": "blocks.1.hook_resid_post",
        "held_out_fraction": FRACTION,
        "model_name": str(root / "model"),
    }
    sae = build_sae(SAEConfig(architecture="standard", d_in=64, d_sae=128, metadata=meta))
    save_sae(sae, root / "sae")
    held = sum(is_held_out(c, FRACTION) for c in convs)
    assert 0 < held < N_CONVERSATIONS
    return root, data, held


def _eval(setup, *args: str) -> tuple[str, dict]:
    root, data, _ = setup
    out = root / "eval.json"
    res = CliRunner().invoke(
        main, ["eval", str(root / "sae"), "--data", str(data), "--max-len", "128", "--json", str(out),
               "--quiet", *args],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return res.output, json.loads(out.read_text())


def test_held_out_is_the_default_and_says_so(setup):
    held = setup[2]
    output, ev = _eval(setup, "--no-lm-loss")
    assert f"held-out split: {held} of {N_CONVERSATIONS} conversations (fraction 0.05)" in output
    assert ev["split"] == {"split": "held-out", "available": N_CONVERSATIONS, "held_out_fraction": FRACTION,
                           "selected": held, "conversations": held, "max_conversations": 200}  # fmt: skip
    assert ev["n_sequences"] == held


def test_split_all_uses_every_conversation(setup):
    output, ev = _eval(setup, "--split", "all", "--device", "cpu")
    assert f"all: {N_CONVERSATIONS} of {N_CONVERSATIONS} conversations\n" in output
    assert ev["split"]["split"] == "all" and ev["split"]["conversations"] == N_CONVERSATIONS
    assert ev["n_sequences"] == N_CONVERSATIONS and ev["device"] == "cpu"
    assert "delta_lm_loss" in ev["metrics"]


def test_the_cap_is_reported(setup):
    output, ev = _eval(setup, "--split", "all", "--max-conversations", "40", "--no-lm-loss")
    assert f"all: 40 of {N_CONVERSATIONS} conversations (capped by --max-conversations 40)" in output
    assert ev["n_sequences"] == 40 == ev["split"]["conversations"]
    output, _ = _eval(setup, "--max-conversations", "2", "--no-lm-loss")
    line = (
        f"held-out split: 2 of {N_CONVERSATIONS} conversations (fraction 0.05; {setup[2]} held out, capped by"
    )
    assert f"{line} --max-conversations 2)" in output


def test_bad_split_and_device_are_refused(setup):
    root, data, _ = setup
    res = CliRunner().invoke(main, ["eval", str(root / "sae"), "--data", str(data), "--split", "train"])
    assert res.exit_code != 0 and "'held-out'" in res.output and "'all'" in res.output
    res = CliRunner().invoke(main, ["eval", str(root / "sae"), "--data", str(data), "--device", "tpu"])
    assert res.exit_code != 0 and "unknown device 'tpu'" in res.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_eval_matches_cpu(setup):
    _, cpu = _eval(setup, "--split", "all", "--device", "cpu")
    _, cuda = _eval(setup, "--split", "all", "--device", "cuda")
    assert cuda["device"].startswith("cuda")
    for name, value in cpu["metrics"].items():
        assert cuda["metrics"][name] == pytest.approx(value, rel=1e-3, abs=1e-5), name

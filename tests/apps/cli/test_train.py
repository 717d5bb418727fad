"""`fast-steer train` / `fast-steer eval` on a tiny model: a sweep on one stream, evaluation with plots,
resume after a SIGKILL giving the same SAE as an uninterrupted run; and an integration run on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from apps.cli import main
from tests.conftest import CHAT_DATA, read_conversations, save_tiny_model
from tests.train.kill import kill_after_first_checkpoint


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, chatml_tokenizer):
    """A tiny Llama saved as a model folder, and a JSONL of 120 conversations."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_model(root / "model", chatml_tokenizer)
    data = root / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for conv in read_conversations("taskmaster4_coffee.jsonl", 120):
            fh.write(json.dumps({"messages": conv}) + "\n")
    return root / "model", data


def _train_args(model, data, out, tokens="12k", extra=()):
    return ["train", "--model", str(model), "--data", str(data), "--layer", "1", "--dtype", "float32",
            "--tokens", tokens, "--batch-size", "128", "--buffer-tokens", "1024", "--token-budget", "1024",
            "--lr", "1e-3", "--lr-end", "1e-4", "--held-out-fraction", "0.2", "--out", str(out), "--quiet", *extra]  # fmt: skip


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sweep_then_eval_with_plots(tiny_setup, tmp_path, one_thread):
    model, data = tiny_setup
    out = tmp_path / "sweep"
    args = _train_args(model, data, out, tokens="4k", extra=["--arch", "standard", "--arch", "topk", "--k", "8",
                                                             "--expansion", "2", "--l1", "1", "--l1", "3"])  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    names = sorted(Path(p).name for p in report["sae_dirs"])
    assert names == ["standard-x2-l1_1", "standard-x2-l1_3", "topk-x2-k8"]
    assert report["tokens"] == 4096 and report["peak_memory_mib"] > 0
    meta = json.loads((out / "topk-x2-k8" / "cfg.json").read_text())["metadata"]
    assert meta["method"] == "FAST" and meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["training"]["sae"]["k"] == 8 and meta["held_out_fraction"] == 0.2

    res = CliRunner().invoke(
        main, ["eval", str(out), "--data", str(data), "--plot", str(tmp_path / "png"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert "MSE_st" in res.output and "MSE_st set (Table 11): ['<|im_start|>', '<|im_end|>']" in res.output
    assert "held-out split:" in res.output and "of 120 conversations (fraction 0.2)" in res.output
    for name in names:
        ev = json.loads((out / name / "eval.json").read_text())
        assert ev["metrics"]["l0"] > 0 and "delta_lm_loss" in ev["metrics"]
        assert ev["n_sequences"] == ev["split"]["selected"] > 0 and ev["method"] == "fast"
        assert ev["split"]["available"] == 120 and ev["split"]["held_out_fraction"] == 0.2
        assert (tmp_path / "png" / name / "mse_by_token_type.png").stat().st_size > 1000
        assert (tmp_path / "png" / name / "training_curves.png").stat().st_size > 1000


def test_bad_options_give_clear_errors(tiny_setup, tmp_path):
    model, data = tiny_setup
    res = CliRunner().invoke(main, _train_args(model, data, tmp_path / "x", extra=["--arch", "topk"]))
    assert res.exit_code != 0 and "--arch topk needs --k" in res.output
    res = CliRunner().invoke(main, _train_args(model, data, tmp_path / "x", extra=["--method", "bt-p"]))
    assert res.exit_code != 0 and "--pretrain-data" in res.output
    res = CliRunner().invoke(main, _train_args(model, data, tmp_path / "x", tokens="lots"))
    assert res.exit_code != 0 and "not a token count" in res.output
    res = CliRunner().invoke(main, _train_args(model, data, tmp_path / "x", extra=["--width-multiple", "0"]))
    assert res.exit_code != 0 and "width_multiple must be positive, got 0" in res.output


def test_resume_after_sigkill_equals_uninterrupted(tiny_setup, tmp_path, one_thread):
    model, data = tiny_setup
    extra = ["--checkpoint-every", "5", "--arch", "jumprelu", "--expansion", "2"]
    killed = tmp_path / "killed"
    step = kill_after_first_checkpoint(_train_args(model, data, killed, extra=extra), killed)
    assert 0 < step < 94

    res = CliRunner().invoke(main, _train_args(model, data, killed, extra=[*extra, "--resume"]))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["resumed_from_step"] >= step
    full = tmp_path / "full"
    res = CliRunner().invoke(main, _train_args(model, data, full, extra=extra))
    assert res.exit_code == 0, res.output
    a = load_file(str(killed / "sae_weights.safetensors"))
    b = load_file(str(full / "sae_weights.safetensors"))
    for name in b:
        assert torch.equal(a[name], b[name]), name
    ta = json.loads((killed / "cfg.json").read_text())["metadata"]["training"]
    assert (
        ta["tokens_trained"]
        == 94 * 128
        == json.loads((full / "cfg.json").read_text())["metadata"]["training"]["tokens_trained"]
    )


def test_compiled_harvest_trains_the_same_sae(tiny_setup, tmp_path, one_thread):
    model, data = tiny_setup
    extra = ["--expansion", "2", "--seed", "3"]
    runs = {}
    for name, flag in (("eager", []), ("compiled", ["--compile"])):
        res = CliRunner().invoke(
            main, _train_args(model, data, tmp_path / name, tokens="2k", extra=[*extra, *flag])
        )
        assert res.exit_code == 0, res.output
        runs[name] = load_file(str(tmp_path / name / "sae_weights.safetensors"))
        meta = json.loads((tmp_path / name / "cfg.json").read_text())["metadata"]
        assert meta["run"]["compile"] is (True if flag else None) and meta["compiled"] is bool(
            flag
        )  # auto: eager
    for key, eager in runs["eager"].items():  # only float32 rounding in the forward differs
        torch.testing.assert_close(runs["compiled"][key], eager, atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.integration
def test_smollm2_fast_training_beats_zero_feature_baseline(tmp_path):
    from hub import load_model
    from train.config import SAETrainSpec, TrainConfig
    from train.data import load_conversations
    from train.evaluate import EvalConfig, evaluate_sae
    from train.pipeline import train
    from train.run_config import DataConfig, RunConfig, StreamSettings

    loaded = load_model("default", dtype="bfloat16")
    data = [str(CHAT_DATA / "taskmaster4_coffee.jsonl")]
    cfg = TrainConfig(total_tokens=8192, batch_size=512, saes=[SAETrainSpec(expansion=2)], lr=1e-3, lr_end=1e-4,
                      checkpoint_every=0)  # fmt: skip
    run = RunConfig(layer=15, training=cfg, device="cpu", data=DataConfig(chat=data),
                    stream=StreamSettings(buffer_tokens=2048, token_budget=2048))  # fmt: skip
    result = train(run, tmp_path / "sae", loaded=loaded, progress=False)
    from hub import load_sae

    sae = load_sae(result.sae_dirs[0])
    held = load_conversations(data, split="held_out")
    res = evaluate_sae(sae, *loaded, list(held)[:12], 15, EvalConfig(lm_loss=False), progress=False)
    m = res.metrics
    assert m["explained_variance"] > m["explained_variance_bdec_only"] + 0.1, m
    assert 0 < m["l0"] < sae.d_sae


def test_eval_follows_the_first_token_exclusion_of_training(tiny_setup, tmp_path, one_thread):
    model, data = tiny_setup
    out = tmp_path / "skip"
    res = CliRunner().invoke(
        main, _train_args(model, data, out, tokens="1k", extra=["--exclude-first-token"])
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "cfg.json").read_text())["metadata"]["exclude_first_token"] is True
    res = CliRunner().invoke(main, ["eval", str(out), "--data", str(data), "--quiet"])
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["config"]["exclude_first_token"] is True, (
        "the headline metrics leave position 0 out, as training did"
    )
    assert "left out (as in training)" in res.output


def test_paper_preset_dry_run_prints_every_app_c_value():
    res = CliRunner().invoke(main, ["train", "--preset", "paper", "--layer", "15", "--data", str(CHAT_DATA),
                                    "--arch", "standard", "--arch", "jumprelu", "--dry-run", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    t = cfg["training"]
    assert (t["lr"], t["lr_end"], t["batch_size"], t["total_tokens"]) == (7e-5, 7e-6, 128, 40_960_000)
    assert cfg["schedule"] == {"total_steps": 320_000, "lr_warmup_steps": 16_000, "lr_decay_steps": 64_000,
                               "sparsity_warmup_steps": 10_000}  # fmt: skip
    assert [s["sparsity_coefficient"] for s in t["saes"]] == [5.0, 0.01]
    assert (t["saes"][1]["jumprelu_bandwidth"], t["saes"][1]["jumprelu_init_threshold"]) == (0.001, 0.001)
    assert (t["adam_beta1"], t["adam_beta2"], t["seed"], t["sae_dtype"]) == (0.9, 0.999, 42, "float32")
    assert t["normalize_activations"] == "none" and t["encoder_init"] == "kaiming"
    assert "first 32768 tokens" in cfg["initialisation"]["b_dec"] and cfg["device"] == "cpu"
    res = CliRunner().invoke(
        main, ["train", "--layer", "1", "--data", str(CHAT_DATA), "--dry-run", "--device", "gpu"]
    )
    assert (
        res.exit_code != 0 and "unknown device 'gpu'; expected auto, cpu, cuda, cuda:N or mps" in res.output
    )


def test_l1_and_l0_set_the_coefficients_of_their_own_architectures():
    """`train --l1` / `--l0` mean what they mean in `experiment reproduce`: standard's L1, jumprelu's L0."""
    from train.config import preset_config

    base = ["train", "--layer", "1", "--data", str(CHAT_DATA), "--dry-run", "--device", "cpu"]
    both = [*base, "--arch", "standard", "--arch", "jumprelu"]

    def coefficients(args):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        return [(s["arch"], s["sparsity_coefficient"]) for s in json.loads(res.output)["training"]["saes"]]

    assert coefficients([*both, "--l1", "2", "--l1", "3", "--l0", "0.5"]) == [
        ("standard", 2.0), ("standard", 3.0), ("jumprelu", 0.5)
    ]  # fmt: skip
    preset = preset_config("default", total_tokens=1)
    assert coefficients([*both, "--l0", "0.5"]) == [("standard", preset.l1_coefficient), ("jumprelu", 0.5)]
    assert coefficients([*both, "--l1", "2"]) == [("standard", 2.0), ("jumprelu", preset.l0_coefficient)]
    res = CliRunner().invoke(main, [*base, "--arch", "jumprelu", "--l1", "3"])
    assert (
        res.exit_code != 0 and "--l1 applies to standard SAEs; this run trains jumprelu (--l0)" in res.output
    )


def test_train_help_says_where_token_ids_are_kept_and_how_to_turn_that_off():
    from train.token_cache import TOKEN_CACHE_ENV

    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "<cache>/tokens" in text and f"{TOKEN_CACHE_ENV}=0 turns that off" in text

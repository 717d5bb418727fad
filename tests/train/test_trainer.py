"""The trainer on synthetic activations: several SAEs on one stream, resume, and a 2-process gloo run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from hub import fast_dtype, load_sae
from tests.conftest import free_port
from train.config import SAETrainSpec, TrainConfig
from train.trainer import LOG_FILE, SUMMARY_FILE, SAETrainer, geometric_median

from .dp_worker import dp_config, dp_worker
from .streams import SparseStream

SPECS = [
    SAETrainSpec(arch="standard", expansion=2, sparsity_coefficient=0.05),
    SAETrainSpec(
        arch="jumprelu",
        expansion=2,
        sparsity_coefficient=0.01,
        jumprelu_bandwidth=0.05,
        jumprelu_init_threshold=0.05,
    ),
    SAETrainSpec(arch="topk", expansion=2, k=6),
]


def _cfg(steps: int = 100, batch: int = 64, **kw) -> TrainConfig:
    values = dict(
        total_tokens=steps * batch,
        batch_size=batch,
        saes=SPECS,
        lr=2e-2,
        lr_end=2e-3,
        dead_feature_window=batch * 10,
        checkpoint_every=0,
        log_every=5,
        seed=3,
    )
    values.update(kw)
    return TrainConfig(**values)


def test_geometric_median_matches_the_1d_median_and_resists_outliers():
    pts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert geometric_median(pts).item() == pytest.approx(2.0, abs=1e-3)
    cloud = torch.randn(200, 4) + torch.tensor([1.0, -2.0, 0.5, 3.0])
    cloud[:5] += 1e4  # a few huge outliers (like SmolLM2's first token) barely move it
    assert torch.allclose(geometric_median(cloud), torch.tensor([1.0, -2.0, 0.5, 3.0]), atol=0.3)


def test_three_architectures_train_on_one_stream(tmp_path):
    torch.set_num_threads(1)
    trainer = SAETrainer(_cfg(), d_in=16, out_dir=tmp_path, metadata={"model": "synthetic"}, progress=False)
    first = next(SparseStream(seed=0))
    result = trainer.fit(SparseStream(seed=0))
    assert result.steps == 100 and result.tokens == 100 * 64
    assert [p.name for p in result.sae_dirs] == [s.name for s in trainer.specs]

    lines = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(5, 101, 5))
    assert trainer.scale == pytest.approx(16**0.5 / first.norm(dim=-1).mean().item(), rel=1e-5)
    scaled = first * trainer.scale  # the log's MSE is on activations scaled to an average norm sqrt(d_in)
    baseline = ((scaled - geometric_median(scaled)) ** 2).sum(-1).mean().item()  # b_dec-only reconstruction
    for name in trainer.names:
        mses = [r["saes"][name]["mse"] for r in lines]
        assert mses[-1] < 0.5 * mses[0], (name, mses)
        assert mses[-1] < 0.3 * baseline, (name, mses[-1], baseline)
        assert 0 < lines[-1]["saes"][name]["l0"] < 32
    assert lines[-1]["saes"]["topk-x2-k6"]["l0"] <= 6

    for sae, folder, spec in zip(trainer.saes, result.sae_dirs, trainer.specs, strict=True):
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))  # unit decoder rows
        loaded = load_sae(folder)
        assert loaded.architecture == spec.arch and loaded.cfg.apply_b_dec_to_input is False
        assert loaded.cfg.normalize_activations == "none"  # the scaling factor is folded into the weights
        torch.testing.assert_close(loaded.encode(first), sae.encode(first), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded(first), sae(first), atol=1e-4, rtol=1e-4)
        meta = loaded.cfg.metadata
        assert meta["model"] == "synthetic" and meta["training"]["tokens_trained"] == 6400
        assert meta["training"]["sae"]["arch"] == spec.arch
    jump = load_sae(result.sae_dirs[1])
    torch.testing.assert_close(jump.threshold, trainer.objectives[1].log_threshold.exp().detach())
    assert ((sae.encode(first) > 0).sum(-1) <= 6).all()  # the topk SAE on raw activations
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["finished"] and summary["peak_memory_mib"] > 0
    assert not (tmp_path / "checkpoints").exists()  # removed once the SAEs are written


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(steps=30, checkpoint_every=7)
    full = SAETrainer(cfg, d_in=16, out_dir=tmp_path / "full", progress=False)
    full.fit(SparseStream(seed=1))

    crashed = SAETrainer(cfg, d_in=16, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(SparseStream(seed=1, fail_after=17))
    assert json.loads((tmp_path / "run/checkpoints/latest.json").read_text())["step"] == 14

    resumed = SAETrainer(cfg, d_in=16, out_dir=tmp_path / "run", progress=False)
    result = resumed.fit(SparseStream(seed=1), resume=True)
    assert result.resumed_from_step == 14 and result.tokens == full.tokens
    for a, b in zip(full.objectives, resumed.objectives, strict=True):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), name
    lines = [json.loads(line) for line in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(5, 31, 5))  # the crashed run's later lines dropped
    for line in lines:  # the time split between the stream and the SAE steps (the progress bar shows it)
        assert line["data_share"] >= 0 and line["step_share"] > 0
        assert line["data_share"] + line["step_share"] == pytest.approx(1)

    again = SAETrainer(cfg, d_in=16, out_dir=tmp_path / "run", progress=False)
    assert again.fit(SparseStream(seed=1), resume=True).steps == 30  # finished: nothing retrained
    changed = SAETrainer(
        _cfg(steps=31, checkpoint_every=7), d_in=16, out_dir=tmp_path / "run", progress=False
    )
    with pytest.raises(ValueError, match="total_tokens"):
        changed.fit(SparseStream(seed=1), resume=True)


def test_bad_batches_are_rejected_with_the_expected_shape(tmp_path):
    trainer = SAETrainer(_cfg(), d_in=16, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"expected a tensor of shape \[64, 16\]"):
        trainer.fit(iter([torch.zeros(64, 15)]))


def test_two_process_gloo_run_matches_one_process(tmp_path):
    torch.set_num_threads(1)
    mp.start_processes(dp_worker, args=(2, free_port(), str(tmp_path / "dp")), nprocs=2, start_method="spawn")
    r0 = load_file(str(tmp_path / "dp/rank0.safetensors"))
    r1 = load_file(str(tmp_path / "dp/rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # all-reduced gradients: identical replicas

    single = SAETrainer(dp_config(), d_in=16, out_dir=tmp_path / "one", progress=False)
    single.fit(SparseStream(seed=2))
    for i, obj in enumerate(single.objectives):
        for k, v in obj.state_dict().items():
            torch.testing.assert_close(r0[f"{i}.{k}"], v, atol=2e-5, rtol=1e-4)
    assert len(list((tmp_path / "dp").glob("*-x2-*/cfg.json"))) == 3  # one writer of SAE folders


def test_initialisation_reads_the_first_init_tokens_and_metadata_is_built_after_fit(tmp_path):
    """b_dec is the geometric median of the first `init_tokens` (several batches), the paper's independent
    Kaiming-uniform encoder is not W_dec.T, and the metadata callable sees the finished stream."""
    torch.set_num_threads(1)
    cfg = _cfg(steps=6, saes=[SPECS[0]], normalize_activations="none", encoder_init="kaiming", lr=1e-12,
               lr_end=1e-12)  # fmt: skip
    stream = SparseStream(seed=1)
    expected = torch.cat([next(SparseStream(seed=1)) for _ in range(1)])
    first_four = torch.cat([b for _, b in zip(range(4), SparseStream(seed=1), strict=False)])
    assert not torch.equal(expected, first_four)
    seen = {}
    trainer = SAETrainer(cfg, 16, tmp_path, metadata=lambda: {"served": stream.served}, progress=False)
    encoder = trainer.saes[0].W_enc.detach().clone()
    assert not torch.allclose(encoder, trainer.saes[0].W_dec.detach().T)
    trainer.fit(stream, init_tokens=4 * 64)
    seen["meta"] = load_sae(tmp_path).cfg.metadata
    torch.testing.assert_close(
        trainer.saes[0].b_dec.detach(), geometric_median(first_four), atol=1e-4, rtol=0
    )
    assert trainer.scale == 1.0  # raw activations
    assert seen["meta"]["served"] == 6 and seen["meta"]["training_tokens"] == 6 * 64
    assert seen["meta"]["expansion_factor"] == 2


def test_a_fixed_scale_serves_instead_of_an_estimate(tmp_path):
    trainer = SAETrainer(
        _cfg(steps=2, saes=[SPECS[0]], norm_scaling_factor=0.25), 16, tmp_path, progress=False
    )
    trainer.fit(SparseStream(seed=2))
    assert trainer.scale == 0.25
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        _cfg(normalize_activations="none", norm_scaling_factor=0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_three_architectures_train_on_cuda_with_dead_features(tmp_path):
    """The TopK auxiliary loss sees dead features (a short window) on the GPU: no device mismatch."""
    from train.distributed import DistContext

    cfg = _cfg(steps=30, dead_feature_window=64)
    trainer = SAETrainer(cfg, 16, tmp_path, dist=DistContext(device="cuda"), progress=False)
    result = trainer.fit(SparseStream(seed=0))
    assert result.steps == 30 and all(s.device.type == "cuda" for s in trainer.since_fired)
    assert any(bool((s >= 64).any()) for s in trainer.since_fired)
    topk = json.loads((tmp_path / LOG_FILE).read_text().splitlines()[-1])["saes"]["topk-x2-k6"]
    assert topk["penalty"] > 0, "the auxiliary loss ran on dead features"


def test_gsnr_is_logged_and_leaves_training_unchanged(tmp_path):
    torch.set_num_threads(1)
    with_gsnr = SAETrainer(_cfg(steps=10, gsnr_every=5), 16, tmp_path / "a", progress=False)
    with_gsnr.fit(SparseStream(seed=4))
    plain = SAETrainer(_cfg(steps=10), 16, tmp_path / "b", progress=False)
    plain.fit(SparseStream(seed=4))
    for a, b in zip(with_gsnr.saes, plain.saes, strict=True):
        assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    lines = [json.loads(line) for line in (tmp_path / "a" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10]
    for record in lines:
        for name in with_gsnr.names:
            assert record["saes"][name]["gsnr_W_enc"] > 0 and record["saes"][name]["gsnr_W_dec"] > 0
    assert (
        "gsnr_W_enc"
        not in json.loads((tmp_path / "b" / LOG_FILE).read_text().splitlines()[0])["saes"]["topk-x2-k6"]
    )
    with pytest.raises(ValueError, match="multiple of log_every"):
        _cfg(gsnr_every=3)


def test_autocast_follows_native_bfloat16_unless_set(tmp_path):
    auto = TrainConfig(total_tokens=64)
    assert auto.autocast is None and auto.sae_autocast("cuda:0")
    assert auto.sae_autocast("cpu") == (fast_dtype("cpu") == "bfloat16")
    assert not TrainConfig(total_tokens=64, autocast=False).sae_autocast("cuda")
    assert TrainConfig(total_tokens=64, autocast=True).sae_autocast("cpu")
    trainer = SAETrainer(_cfg(autocast=False), d_in=16, out_dir=tmp_path, progress=False)
    trainer.fit(SparseStream(seed=0))
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["sae_autocast"] is False

"""Learning-rate and sparsity schedules at their key steps, and the presets."""

from __future__ import annotations

import math

import pytest

from train.config import SAETrainSpec, TrainConfig, preset_config
from train.schedules import LRSchedule, SparsityWarmup


def test_lr_warmup_cosine_floor_and_final_decay():
    s = LRSchedule(lr=1.0, lr_end=0.1, total_steps=100, warmup_steps=10, decay_steps=20)
    assert math.isclose(s(0), 0.1)  # starts at lr / warmup_steps (SAELens LinearLR start_factor)
    assert math.isclose(s(9), 1.0)  # end of warm-up
    assert math.isclose(s(10), 1.0)  # cosine starts at lr
    assert math.isclose(s(10 + 35), 0.1 + 0.9 * (1 + math.cos(math.pi * 35 / 70)) / 2)
    assert s(10 + 69) == pytest.approx(0.1, abs=1e-3)  # reaches the floor
    assert math.isclose(s(80), 0.1)  # final linear decay starts at the floor
    assert math.isclose(s(90), 0.05)
    assert s(99) == pytest.approx(0.005)
    lrs = [s(i) for i in range(100)]
    assert all(b <= a + 1e-12 for a, b in zip(lrs[9:], lrs[10:], strict=False))  # monotone after warm-up


def test_lr_without_warmup_or_decay():
    s = LRSchedule(lr=2.0, lr_end=0.5, total_steps=10, warmup_steps=0, decay_steps=0)
    assert s(0) == 2.0
    assert s(9) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi * 9 / 10)) / 2)
    with pytest.raises(ValueError, match="exceed"):
        LRSchedule(lr=1, lr_end=0.1, total_steps=5, warmup_steps=3, decay_steps=3)
    cfg = TrainConfig(total_tokens=100, batch_size=1, lr_warmup_fraction=0.05, lr_decay_fraction=0.2)
    assert (cfg.lr_warmup_steps, cfg.lr_decay_steps) == (5, 20)


def test_sparsity_warmup():
    w = SparsityWarmup(coefficient=5.0, warmup_steps=10)
    assert w(0) == pytest.approx(0.5)
    assert w(4) == pytest.approx(2.5)
    assert w(9) == 5.0 and w(1000) == 5.0
    assert SparsityWarmup(5.0, 0)(0) == 5.0


def test_paper_preset_matches_the_paper():
    """Every value of App. C (arXiv 2506.07691, on SAELens 5.3.3)."""
    cfg = preset_config("paper", saes=[SAETrainSpec(arch="standard"), SAETrainSpec(arch="jumprelu")])
    assert (cfg.lr, cfg.lr_end, cfg.batch_size, cfg.total_tokens) == (7e-5, 7e-6, 128, 40_960_000)
    assert cfg.schedule() == {
        "total_steps": 320_000,
        "lr_warmup_steps": 16_000,
        "lr_decay_steps": 64_000,
        "sparsity_warmup_steps": 10_000,
    }
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.grad_clip, cfg.seed) == (0.9, 0.999, 1.0, 42)
    assert (cfg.l1_coefficient, cfg.l0_coefficient) == (5.0, 0.01)
    assert [s.sparsity_coefficient for s in cfg.resolved_specs()] == [5.0, 0.01]
    jumprelu = cfg.resolved_specs()[1]
    assert (jumprelu.jumprelu_bandwidth, jumprelu.jumprelu_init_threshold) == (0.001, 0.001)
    assert cfg.sae_dtype == "float32" and not cfg.autocast
    assert cfg.normalize_activations == "none" and cfg.norm_scaling_factor is None  # raw residuals
    assert cfg.encoder_init == "kaiming"  # W_enc independent of W_dec
    lr = LRSchedule(cfg.lr, cfg.lr_end, cfg.total_steps, cfg.lr_warmup_steps, cfg.lr_decay_steps)
    assert lr(15_999) == pytest.approx(7e-5) and lr(16_000) == pytest.approx(7e-5)
    assert lr(320_000 - 64_000) == pytest.approx(7e-6)
    d = TrainConfig.from_dict(cfg.to_dict())
    assert d.to_dict() == cfg.to_dict()


def test_config_errors_are_specific():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("fast")
    with pytest.raises(ValueError, match="same settings"):
        TrainConfig(total_tokens=10, saes=[SAETrainSpec(), SAETrainSpec()])
    with pytest.raises(ValueError, match="lr_end"):
        TrainConfig(total_tokens=10, lr=1e-4, lr_end=1e-3)
    cfg = TrainConfig(total_tokens=10_001, batch_size=1000)
    assert (cfg.total_steps, cfg.final_tokens) == (11, 11_000)


def test_jumprelu_names_tell_bandwidth_and_threshold_apart():
    base = SAETrainSpec(arch="jumprelu", sparsity_coefficient=1.0)
    wide = SAETrainSpec(
        arch="jumprelu", sparsity_coefficient=1.0, jumprelu_bandwidth=0.05, jumprelu_init_threshold=0.1
    )
    assert base.name == "jumprelu-x8-l0_1"
    assert wide.name == "jumprelu-x8-l0_1-bw_0.05-t0_0.1"
    assert len(TrainConfig(total_tokens=10, saes=[base, wide]).resolved_specs()) == 2


def test_presets_fill_in_jumprelu_bandwidth_and_threshold():
    spec = SAETrainSpec(arch="jumprelu")
    (default,) = preset_config("default", saes=[spec]).resolved_specs()
    (paper,) = preset_config("paper", saes=[spec]).resolved_specs()
    assert (default.jumprelu_bandwidth, default.jumprelu_init_threshold) == (0.1, 0.5)
    assert default.name == "jumprelu-x8-l0_0.01-bw_0.1-t0_0.5"
    assert (paper.jumprelu_bandwidth, paper.jumprelu_init_threshold) == (0.001, 0.001)
    assert paper.name == "jumprelu-x8-l0_0.01"
    (own,) = preset_config(
        "default", saes=[SAETrainSpec(arch="jumprelu", jumprelu_init_threshold=0.2)]
    ).resolved_specs()
    assert (own.jumprelu_bandwidth, own.jumprelu_init_threshold) == (0.1, 0.2)

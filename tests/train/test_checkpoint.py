"""Checkpoint files: generic state flattening, atomic commit, pointer and pruning."""

from __future__ import annotations

import json

import pytest
import torch

from train import checkpoint as ckpt


def test_nested_state_round_trips_with_int_keys_and_scalars(tmp_path):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3, betas=(0.9, 0.99))
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "nested": [{"a": torch.arange(4), "b": None}, "text", 3.5, True],
        "generator": torch.Generator().manual_seed(5).get_state(),
    }
    ckpt.write_part(tmp_path, "part", state)
    back = ckpt.read_part(tmp_path, "part")
    assert set(back["optimizer"]["state"]) == {0}  # int keys survive JSON
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["state"][0]["step"].shape == ()  # 0-d tensors survive safetensors
    assert torch.equal(back["nested"][0]["a"], torch.arange(4)) and back["nested"][1:] == ["text", 3.5, True]
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3, 2))], lr=1e-3)
    fresh.load_state_dict(back["optimizer"])  # a real optimiser accepts the restored state
    assert fresh.param_groups[0]["betas"][1] == 0.99
    assert not any(p.suffix == ".pt" for p in tmp_path.iterdir())  # safetensors + JSON only


def test_unsupported_values_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"cannot checkpoint a set at x"):
        ckpt.write_part(tmp_path, "bad", {"x": {1, 2}})


def test_commit_is_atomic_points_latest_and_prunes(tmp_path):
    assert ckpt.latest(tmp_path) is None
    for step in (10, 20):
        staging = ckpt.begin(tmp_path, step)
        ckpt.write_part(staging, "trainer", {"step": step})
        ckpt.commit(tmp_path, step, keep=1)
    ckpt.begin(tmp_path, 30)  # a run killed while writing step 30 leaves only a staging folder
    folder = ckpt.latest(tmp_path)
    assert folder.name == "step_000000020"
    assert ckpt.read_part(folder, "trainer") == {"step": 20}
    assert not (tmp_path / "step_000000010").exists()
    assert json.loads((tmp_path / ckpt.LATEST).read_text())["step"] == 20
    with pytest.raises(FileNotFoundError, match="no part 'stream_rank0'"):
        ckpt.read_part(folder, "stream_rank0")

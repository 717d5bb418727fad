"""Every validation error, on hand-broken SAE folders: each says what is wrong and where."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub import SAEFormatError, load_sae, save_sae
from tests.hub.sae_factory import random_sae, write_fast_release_sae, write_sparsify_sae


@pytest.fixture
def folder(tmp_path):
    return save_sae(random_sae("jumprelu"), tmp_path / "sae")


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, drop=(), **replace):
    path = folder / "sae_weights.safetensors"
    tensors = load_file(str(path))
    for name in drop:
        del tensors[name]
    tensors.update(replace)
    save_file(tensors, str(path))


def test_sae_format_error_is_a_value_error():
    assert issubclass(SAEFormatError, ValueError)


def test_missing_cfg(folder):
    (folder / "cfg.json").unlink()
    with pytest.raises(SAEFormatError, match="missing file cfg.json"):
        load_sae(folder)


def test_missing_weights(folder):
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFormatError, match="missing file sae_weights.safetensors"):
        load_sae(folder)


def test_cfg_not_json(folder):
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="cfg.json is not valid JSON"):
        load_sae(folder)


def test_cfg_missing_key(folder):
    _edit_cfg(folder, d_sae=None)
    with pytest.raises(SAEFormatError, match="lacks required key d_sae"):
        load_sae(folder)


def test_missing_tensor(folder):
    _edit_tensors(folder, drop=["threshold"])
    with pytest.raises(SAEFormatError, match=r"missing tensor\(s\) threshold"):
        load_sae(folder)


def test_extra_tensor(folder):
    _edit_tensors(folder, log_feature_sparsity=torch.zeros(64))
    with pytest.raises(SAEFormatError, match=r"unexpected tensor\(s\) log_feature_sparsity"):
        load_sae(folder)


def test_wrong_shape(folder):
    _edit_tensors(folder, W_enc=torch.zeros(16, 32))
    with pytest.raises(SAEFormatError, match=r"tensor W_enc has shape \[16, 32\], expected \[16, 64\]"):
        load_sae(folder)


def test_non_float_tensor(folder):
    _edit_tensors(folder, b_enc=torch.zeros(64, dtype=torch.int64))
    with pytest.raises(SAEFormatError, match="tensor b_enc is stored as I64"):
        load_sae(folder)


def test_dtype_disagrees_with_cfg(folder):
    _edit_tensors(folder, b_dec=torch.zeros(16, dtype=torch.bfloat16))
    with pytest.raises(SAEFormatError, match="b_dec is stored as bfloat16 but cfg.json says dtype=float32"):
        load_sae(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf(folder, bad):
    w = torch.zeros(64, 16)
    w[3, 4] = bad
    _edit_tensors(folder, W_dec=w)
    with pytest.raises(SAEFormatError, match=r"tensor W_dec has 1 NaN/inf value\(s\)"):
        load_sae(folder)


def test_overflow_when_converting_is_caught(tmp_path):
    sae = random_sae("standard")
    with torch.no_grad():
        sae.b_enc[0] = 1e6  # beyond float16's range
    folder = save_sae(sae, tmp_path / "s")
    assert load_sae(folder).b_enc[0] == 1e6
    with pytest.raises(SAEFormatError, match=r"b_enc has 1 NaN/inf value\(s\) \(dtype torch.float16\)"):
        load_sae(folder, dtype="float16")


def test_unknown_architecture(folder):
    _edit_cfg(folder, architecture="gated")
    with pytest.raises(
        SAEFormatError,
        match="unknown SAE architecture 'gated'; expected one of jumprelu, jumprelu_skip_transcoder, "
        "jumprelu_transcoder, skip_transcoder, standard, topk, transcoder",
    ):
        load_sae(folder)


def test_unknown_architecture_in_v5_config(tmp_path):
    folder, _ = write_fast_release_sae(tmp_path)
    _edit_cfg(folder, architecture="gated")
    with pytest.raises(SAEFormatError, match="unknown SAE architecture 'gated'"):
        load_sae(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"normalize_activations": "covariance_whitening"}, "normalize_activations='covariance_whitening'"),
        ({"reshape_activations": "hook_z"}, "reshape_activations='hook_z'"),
        ({"dtype": "int8"}, "unsupported dtype 'int8'"),
        ({"d_in": -3}, "d_in must be a positive integer"),
        ({"architecture": "topk"}, "a topk SAE needs an integer k"),
    ],
)
def test_unsupported_config_values(folder, changes, message):
    _edit_cfg(folder, **changes)
    with pytest.raises(SAEFormatError, match=message):
        load_sae(folder)


def test_corrupt_safetensors(folder):
    (folder / "sae_weights.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(SAEFormatError, match="not a readable safetensors file"):
        load_sae(folder)


def test_pickle_is_never_read(tmp_path, monkeypatch):
    """A folder with only a pickle is refused, and no loader ever calls torch.load / pickle.load."""
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"W_enc": torch.zeros(2, 2)}, pickled / "sae_weights.pt")
    with pytest.raises(SAEFormatError, match=r"stored only as a pickle.*fast-steer convert --allow-pickle"):
        load_sae(pickled)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle must never be read from an SAE folder")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    release, _ = write_fast_release_sae(tmp_path / "release")
    sparse, _ = write_sparsify_sae(tmp_path / "sparsify")
    for source in (save_sae(random_sae("topk"), tmp_path / "v6"), release, sparse):
        assert load_sae(source).d_in == 16

"""save_sae / load_sae round trips, dtype handling, atomic writes, metadata and layer parsing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hub import SAEFormatError, list_sae_ids, load_sae, sae_layer, sae_metadata, save_sae
from tests.hub.sae_factory import random_sae

NORMS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("norm", NORMS)
def test_round_trip_every_architecture_and_normalisation(tmp_path, arch, norm):
    sae = random_sae(arch, normalize=norm)
    folder = save_sae(sae, tmp_path / "sae")
    loaded = load_sae(folder)
    x = torch.randn(3, 5, sae.d_in) * 4
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
        assert torch.allclose(loaded(x), sae(x), atol=1e-4)
    assert (loaded.architecture, loaded.d_in, loaded.d_sae, loaded.cfg.k) == (arch, 16, 64, sae.cfg.k)
    if norm == "expected_average_only_in":  # folded into the weights, so SAELens reads it too
        assert loaded.cfg.normalize_activations == "none"
        assert loaded.metadata["folded_norm_scaling_factor"] == pytest.approx(0.37)
    else:
        assert loaded.cfg.normalize_activations == norm
        assert torch.equal(loaded.W_enc, sae.W_enc)


def test_unfolded_norm_scaling_round_trips_exactly(tmp_path):
    sae = random_sae("standard", normalize="expected_average_only_in")
    loaded = load_sae(save_sae(sae, tmp_path / "s", fold_norm_scaling=False))
    assert loaded.cfg.normalize_activations == "expected_average_only_in"
    assert loaded.cfg.norm_scaling_factor == pytest.approx(0.37)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), sae.state_dict().values(), strict=True)
    )


def test_saved_layout_is_saelens_v6(tmp_path):
    folder = save_sae(random_sae("topk", method="FAST", training_tokens=1000), tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert {
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
        "k",
    } <= set(cfg)
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and meta["hook_layer"] == 2
    assert meta["sae_lens_version"].startswith("6.") and meta["method"] == "FAST"
    with safe_open(str(folder / "sae_weights.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    assert shapes == {"W_enc": [16, 64], "b_enc": [64], "W_dec": [64, 16], "b_dec": [16]}


def test_non_contiguous_parameters_are_saved(tmp_path):
    sae = random_sae("standard")
    with torch.no_grad():
        sae.W_enc.data = sae.W_dec.data.clone().T  # [d_in, d_sae] as a transposed, non-contiguous view
    assert not sae.W_enc.is_contiguous()
    loaded = load_sae(save_sae(sae, tmp_path / "s"))
    assert torch.equal(loaded.W_enc, sae.W_enc)


def test_bfloat16_round_trip_and_conversion(tmp_path):
    sae16 = random_sae("jumprelu", dtype="bfloat16")
    folder = save_sae(sae16, tmp_path / "bf16")
    assert json.loads((folder / "cfg.json").read_text())["dtype"] == "bfloat16"
    loaded = load_sae(folder)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.threshold, sae16.threshold)
    as32 = load_sae(folder, dtype="float32")
    assert as32.dtype == torch.float32 and as32.cfg.dtype == "float32"
    assert torch.equal(as32.W_dec, sae16.W_dec.float())
    x = torch.randn(4, 16)
    assert loaded.encode(x).dtype == torch.bfloat16


def test_parameters_converted_after_creation_are_saved_in_their_dtype(tmp_path):
    sae = random_sae("standard").to(torch.bfloat16)
    cfg = json.loads((save_sae(sae, tmp_path / "s") / "cfg.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert load_sae(tmp_path / "s").dtype == torch.bfloat16


def test_overwrite_keeps_other_files_and_leaves_no_temp(tmp_path):
    folder = save_sae(random_sae("standard", seed=1), tmp_path / "sae")
    (folder / "eval.json").write_text('{"l0": 12.5}')
    second = random_sae("topk", seed=2)
    save_sae(second, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no .tmp / .old left behind
    assert (folder / "eval.json").read_text() == '{"l0": 12.5}'
    assert load_sae(folder).architecture == "topk"


def test_failed_save_leaves_existing_folder_untouched(tmp_path):
    folder = save_sae(random_sae("standard"), tmp_path / "sae")
    before = (folder / "sae_weights.safetensors").read_bytes()
    bad = random_sae("standard")
    bad.cfg.metadata["oops"] = object()
    with pytest.raises(SAEFormatError, match="JSON-serialisable"):
        save_sae(bad, folder)
    assert (folder / "sae_weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_expected_d_in_mismatch_names_the_layer_width(tmp_path, tiny_model):
    model, _ = tiny_model
    width = model.config.hidden_size
    folder = save_sae(random_sae("standard", d_in=width + 8), tmp_path / "sae")
    with pytest.raises(SAEFormatError, match=rf"d_in={width + 8}.*width \(hidden_size\) {width}"):
        load_sae(folder, expected_d_in=width)
    fits = save_sae(random_sae("standard", d_in=width), tmp_path / "fits")
    assert load_sae(fits, expected_d_in=width).d_in == width


def test_sub_folder_ids(tmp_path):
    for name in ("FAST/a", "FAST/b", "BT(P)/c"):
        save_sae(random_sae("standard"), tmp_path / name)
    assert list_sae_ids(tmp_path) == ["BT(P)/c", "FAST/a", "FAST/b"]
    assert load_sae(tmp_path, "BT(P)/c").d_in == 16
    with pytest.raises(SAEFormatError, match=r"holds 3 SAE\(s\).*BT\(P\)/c, FAST/a, FAST/b"):
        load_sae(tmp_path)
    with pytest.raises(SAEFormatError, match="no sub-folder 'FAST/z'.*FAST/a"):
        load_sae(tmp_path, "FAST/z")


def test_bad_sources(tmp_path):
    with pytest.raises(SAEFormatError, match="neither an existing folder nor a Hub repo id"):
        load_sae(str(tmp_path / "missing" / "deeper"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SAEFormatError, match="is a file"):
        load_sae(tmp_path / "file.txt")


def test_metadata_helper_and_layer_parsing():
    meta = sae_metadata("HuggingFaceTB/SmolLM2-135M-Instruct", 7, context_size=1024, method="BT(F)")
    assert meta["hook_name"] == "blocks.7.hook_resid_post" and meta["hook_layer"] == 7
    assert meta["context_size"] == 1024 and meta["method"] == "BT(F)" and "fast_steer_version" in meta
    assert sae_layer(meta) == 7
    assert sae_layer({"hook_name": "blocks.7.hook_resid_pre"}) == 6
    assert sae_layer({"hook_name": "blocks.0.hook_resid_pre"}) is None
    assert sae_layer({"hook_name": "blocks.3.hook_mlp_out", "hook_layer": 3}) is None
    assert sae_layer({"hf_hook_name": "layers.11"}) == 11
    assert sae_layer({"hook_layer": 4}) == 4
    assert sae_layer({}) is None
    assert sae_layer(random_sae("standard", layer=5)) == 5
    with pytest.raises(ValueError, match="non-negative integer"):
        sae_metadata("m", -1)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        sae_metadata("m", 1, tensor=torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda_in_bfloat16(tmp_path):
    sae = random_sae("jumprelu")
    loaded = load_sae(save_sae(sae, tmp_path / "s"), device="cuda", dtype="bfloat16")
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16 and loaded.cfg.device == "cuda"
    x = torch.randn(4, 16)
    assert torch.allclose(loaded.encode(x.cuda()).float().cpu(), sae.encode(x), atol=0.1, rtol=0.05)

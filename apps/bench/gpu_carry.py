"""`make gpu-carry`: the folder the GPU acceptance kit carries to a bare GPU machine (at most 64 MiB).

The machine has Python 3.12, CUDA torch and an older transformers, no network. The folder holds:
- `wheels/`: the pinned (constraints.txt) wheels of our runtime stack except torch and its own dependencies
  and numpy (present wherever torch and transformers are), plus pytest for the CUDA tests;
- `tokenizer/`: the default model's (SmolLM2) tokenizer, for the random models of real shapes;
- `chat/`: the first conversations of each shared chat JSONL file, a few MB in all.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from steer.errors import ConfigError, FastSteerError

CARRY_LIMIT_MIB = 64.0
WHEELS, TOKENIZER, CHAT = "wheels", "tokenizer", "chat"
# our runtime closure minus torch's own dependencies and numpy; transformers is carried too: the machine's
# 5.17 is older than pyproject's lower bound, and the carried copy comes first on PYTHONPATH
CARRIED_PACKAGES = (
    "transformers", "tokenizers", "huggingface_hub", "safetensors", "kernels", "tomlkit", "typer", "shellingham",
    "rich", "pygments", "markdown-it-py", "mdurl", "annotated-doc", "httpx2", "httpcore2", "anyio", "sniffio",
    "h11", "idna", "certifi", "hf-xet", "gguf", "requests", "urllib3", "charset-normalizer", "accelerate",
    "psutil", "click", "tqdm", "pyyaml", "regex", "packaging", "pydantic", "pydantic-core", "annotated-types",
    "typing-inspection", "truststore",
    "pytest", "pluggy", "iniconfig", "pytest-timeout",
)  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_wheels(folder: Path, constraints: Path, python_version: str = "3.12") -> None:
    """`pip download` the pinned wheels of `CARRIED_PACKAGES` for CPython `python_version` on x86-64 Linux."""
    platforms = [arg for name in PLATFORMS for arg in ("--platform", name)]
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "--abi", abi, *platforms,
           "-c", str(constraints), "-d", str(folder), *CARRIED_PACKAGES]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FastSteerError(f"pip download of the carried wheels failed:\n{proc.stderr[-3000:]}")


def save_tokenizer(source: Path, folder: Path) -> None:
    """The tokenizer (with its chat template) of the model folder `source`, saved into `folder`."""
    from transformers import AutoTokenizer

    if not source.is_dir():
        raise ConfigError(f"tokenizer source {source} not found: run `make model` first (the default model)")
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


def copy_chat_subset(data_dir: Path, folder: Path, max_bytes: int) -> int:
    """The first whole lines of each `*.jsonl` under `data_dir`, `max_bytes` in all (shared evenly)."""
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise ConfigError(f"no *.jsonl conversations in {data_dir}")
    folder.mkdir(parents=True, exist_ok=True)
    share, written = max_bytes // len(files), 0
    for path in files:
        kept = bytearray()
        with open(path, "rb") as fh:
            for line in fh:
                if len(kept) + len(line) > share:
                    break
                kept += line
        (folder / path.name).write_bytes(bytes(kept))
        written += len(kept)
    return written


def folder_mib(folder: Path) -> float:
    """Total size of the files under `folder` (MiB)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def build_carry(folder: Path, tokenizer_source: Path, data_dir: Path, constraints: Path | None,
                data_mib: float = 4.0, limit_mib: float = CARRY_LIMIT_MIB) -> float:  # fmt: skip
    """Fill `folder` (wheels unless `constraints` is None, tokenizer, chat subset); returns its size (MiB).

    Raises when the folder is over `limit_mib` (default: the most the GPU machine takes in).
    """
    if constraints is not None:
        download_wheels(folder / WHEELS, constraints)
    save_tokenizer(tokenizer_source, folder / TOKENIZER)
    copy_chat_subset(data_dir, folder / CHAT, int(data_mib * 2**20))
    size = folder_mib(folder)
    if size > limit_mib:
        raise FastSteerError(
            f"{folder} holds {size:.1f} MiB, more than the {limit_mib:g} MiB that can be carried"
        )
    return size


def main(folder: str = "gpu-carry", constraints: str = "constraints.txt") -> None:
    """`make gpu-carry`: fill `folder` from the default model's cache and the shared chat data; print its size."""
    from hub.default_model import cached_default_dir
    from train.data import shared_data_dir

    size = build_carry(Path(folder), cached_default_dir(), shared_data_dir("chat"), Path(constraints))
    print(f"{folder}: {size:.1f} MiB (at most {CARRY_LIMIT_MIB:.0f} MiB is carried)")


if __name__ == "__main__":
    main(*sys.argv[1:])

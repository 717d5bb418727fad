"""`torch.compile`d decoder layers for the harvesting forward (`RunConfig.compile`, `train --compile`).

Eager PyTorch runs a decoder layer's element-wise work (RMSNorm's casts and reductions, rotary embeddings,
the gated activation, the residual adds) as separate passes over memory; Inductor fuses them. On the
benchmark CPU this makes SmolLM2's forward to layer 15 1.3-1.4x faster, after a one-off compile of about 1.2 s
in a new process (about 7 s on a machine's first run, with an empty Inductor cache), so it pays off from about
30k tokens and is on by default from 64k (`resolve_compile`; README, Speed). Each layer's `forward` is
compiled with dynamic shapes (the padded batch shapes vary) and swapped in only for the harvesting call: forward
hooks run outside the compiled code, and the model is left as it was. Compiling needs a C++ compiler and
Python's headers on a CPU, Triton on a GPU; `check_compile_support` says which is missing.

Two settings keep the compile short (its first call took 3.4 s in a new process with the kernels on disk, now
1.7 s, the batch's forward included): floats specialised up front (otherwise Dynamo traces the layer twice,
restarting when a symbolic float cannot become a tensor), and, on x86, the CPU's vector-ISA flags trusted once
Inductor's own probe found every one of them buildable here (the probe otherwise spawns some 15 subprocesses
in every new process; its verdict is kept beside Inductor's cache, keyed by torch, the compiler and the flags).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import platform
import shutil
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from steer.errors import ConfigError

_UNSET = object()
# auto compiles runs of at least this many tokens: on the benchmark CPU a compile from Inductor's disk cache
# (~1.2 s in a new process) pays for itself from ~30k tokens of SmolLM2, a machine's first (~7 s) from ~180k
AUTO_COMPILE_TOKENS = 2**16
ISA_RECORD = "fast-steer-vector-isa.json"


def check_compile_support(device: torch.device | str) -> None:
    """Raise a ConfigError naming what `torch.compile` lacks on `device` (a C++ compiler and Python's headers;
    Triton)."""
    kind = torch.device(device).type
    if kind == "cpu":
        wanted = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in wanted):
            raise ConfigError(
                f"compile on the CPU needs a C++ compiler for torch.compile: none of {wanted} is on the PATH "
                "(install g++, or set CXX), or train without --compile"
            )
        header = Path(sysconfig.get_paths()["include"]) / "Python.h"
        if not header.is_file():
            raise ConfigError(
                f"compile on the CPU needs Python's C headers for torch.compile's kernels: {header} is missing "
                "(install python3-dev or your Python's headers), or train without --compile"
            )
    elif kind == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("compile on CUDA needs Triton (pip install triton), or train without --compile")
    else:
        raise ConfigError(f"compile supports cpu and cuda devices, not {kind!r}")


def resolve_compile(setting: bool | None, device: torch.device | str, tokens: int) -> bool:
    """Whether a run of `tokens` tokens harvested on `device` compiles: `setting` where given; None (auto):
    on a CPU that has the toolchain, for runs of at least AUTO_COMPILE_TOKENS (eager on GPUs: not measured
    there)."""
    if setting is not None:
        return setting
    if torch.device(device).type != "cpu" or tokens < AUTO_COMPILE_TOKENS:
        return False
    try:
        check_compile_support(device)
    except ConfigError:
        return False
    return True


def compile_forwards(layers: Sequence[nn.Module], device: torch.device | str) -> list[Callable]:
    """Each layer's current `forward`, compiled with dynamic shapes (nothing runs until the first call)."""
    check_compile_support(device)
    trusted = torch.device(device).type == "cpu" and vector_isas_trusted()
    options = {"cpp.vec_isa_ok": True} if trusted else None
    return [
        _floats_specialised(torch.compile(layer.forward, dynamic=True, options=options)) for layer in layers
    ]


def _floats_specialised(compiled: Callable) -> Callable:
    """`compiled`, with Python floats specialised while it runs, so that a compile traces once (no restart).
    Dynamo's flag is set and put back by hand: its `config.patch` costs about 100 us a call, this 3 us."""
    config = torch._dynamo.config

    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        saved, config.specialize_float = config.specialize_float, True
        try:
            return compiled(*args, **kwargs)
        finally:
            config.specialize_float = saved

    return forward


def vector_isas_trusted() -> bool:
    """Whether Inductor may take the CPU's vector-ISA flags as they are (`cpp.vec_isa_ok`): True on x86 once its
    probe, run here now or remembered from an earlier run with the same torch, compiler and CPU flags, could
    build and load every ISA the CPU claims (then trusting the flags picks the same ISAs)."""
    try:
        from torch._inductor import cpu_vec_isa
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # a torch with other internals: Inductor probes as usual
        return False
    compiler = shutil.which(get_cpp_compiler())
    if platform.machine() not in ("x86_64", "AMD64") or compiler is None:
        return False
    flags = set(cpu_vec_isa.x86_isa_checker())
    claimed = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if set(str(isa).split()) <= flags]
    stat = os.stat(compiler)
    key = {
        "torch": torch.__version__,
        "compiler": [compiler, stat.st_size, stat.st_mtime_ns],
        "claimed": claimed,
    }
    record = Path(cache_dir()) / ISA_RECORD
    with contextlib.suppress(OSError, ValueError):
        if json.loads(record.read_text()) == key:
            return True
    if [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] != claimed:  # Inductor's probe, about 1 s
        return False
    with contextlib.suppress(OSError):  # an unwritable cache: the probe runs again next time
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(key))
        partial.replace(record)
    return True


@contextlib.contextmanager
def swapped_forwards(layers: Sequence[nn.Module], forwards: Sequence[Callable] | None) -> Iterator[None]:
    """Run with `forwards` as the layers' forwards (None: their own); afterwards each layer's own (an instance
    attribute, such as accelerate's device-map wrapper, is put back; otherwise the class's forward applies)."""
    if forwards is None:
        yield
        return
    saved = [layer.__dict__.get("forward", _UNSET) for layer in layers]
    for layer, forward in zip(layers, forwards, strict=True):
        layer.forward = forward
    try:
        yield
    finally:
        for layer, old in zip(layers, saved, strict=True):
            if old is _UNSET:
                del layer.forward
            else:
                layer.forward = old

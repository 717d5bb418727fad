"""`torch.compile`d decoder layers for the harvesting forward (`RunConfig.compile`, `train --compile`).

Eager PyTorch runs a decoder layer's element-wise work (RMSNorm's casts and reductions, rotary embeddings,
the gated activation, the residual adds) as separate passes over memory; Inductor fuses them. On the
benchmark CPU this makes SmolLM2's forward to layer 15 about 1.3x faster, after a one-off compile of about
16 s (about 5 s once Inductor's on-disk cache holds the kernels), so it pays off in long runs only (README,
Speed). Each layer's `forward` is compiled with dynamic shapes (the padded batch shapes vary) and swapped in
only for the harvesting call: forward hooks run outside the compiled code, and the model is left as it was.
Compiling needs a C++ compiler on a CPU and Triton on a GPU; `check_compile_support` says which is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from steer.errors import ConfigError

_UNSET = object()


def check_compile_support(device: torch.device | str) -> None:
    """Raise a ConfigError naming what `torch.compile` lacks on `device` (a C++ compiler; Triton)."""
    kind = torch.device(device).type
    if kind == "cpu":
        wanted = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in wanted):
            raise ConfigError(
                f"compile on the CPU needs a C++ compiler for torch.compile: none of {wanted} is on the PATH "
                "(install g++, or set CXX), or train without --compile"
            )
    elif kind == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("compile on CUDA needs Triton (pip install triton), or train without --compile")
    else:
        raise ConfigError(f"compile supports cpu and cuda devices, not {kind!r}")


def compile_forwards(layers: Sequence[nn.Module], device: torch.device | str) -> list[Callable]:
    """Each layer's current `forward`, compiled with dynamic shapes (nothing runs until the first call)."""
    check_compile_support(device)
    return [torch.compile(layer.forward, dynamic=True) for layer in layers]


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

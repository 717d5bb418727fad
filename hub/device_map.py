"""A model larger than one device: spread over devices by accelerate (big-model inference).

`DeviceMap` is what `load_model(device_map=...)` takes: the strategy `from_pretrained` is given as its
`device_map` (`auto` fills the GPUs in order, then the CPU, then disk), the most memory each device may hold,
and the folder for weights offloaded to disk. Its fields are plain JSON, so a run config records it as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steer.errors import ConfigError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
MEMORY_DEVICES = ("cpu", "mps", "disk")  # besides GPU indices (0, 1, ...)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B)?", re.IGNORECASE)
MAX_MEMORY_FORM = (
    "DEVICE=SIZE, e.g. 0=20GiB or cpu=60GiB (DEVICE: a GPU index, cpu, mps or disk; "
    "SIZE: bytes, or a number with KiB/MiB/GiB/TiB or KB/MB/GB/TB)"
)


@dataclass(frozen=True)
class DeviceMap:
    """How accelerate spreads a model: `strategy` (auto | balanced | balanced_low_0 | sequential), the most
    memory each device may hold (`{"0": "20GiB", "cpu": "60GiB"}`; None: all there is), and the folder
    for weights offloaded to disk (needed when the model does not fit into `max_memory`)."""

    strategy: str = "auto"
    max_memory: dict[str, str] | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"device map {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        for device, size in (self.max_memory or {}).items():
            _check_entry(str(device), str(size), f"{device}={size}")

    @classmethod
    def parse(
        cls, strategy: str, max_memory: Sequence[str] = (), offload_folder: str | None = None
    ) -> DeviceMap:
        """From command-line values: `max_memory` as `DEVICE=SIZE` items (`0=20GiB`, `cpu=60GiB`)."""
        return cls(strategy, parse_max_memory(max_memory) or None, offload_folder)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """`device_map`, `max_memory` (GPU indices as ints, as accelerate wants them) and `offload_folder`."""
        out: dict[str, Any] = {"device_map": self.strategy}
        if self.max_memory:
            out["max_memory"] = {
                int(k) if k.isdigit() else k: size_bytes(v) for k, v in self.max_memory.items()
            }
        if self.offload_folder is not None:
            out["offload_folder"] = self.offload_folder
        return out


def parse_max_memory(items: Sequence[str]) -> dict[str, str]:
    """`["0=20GiB", "cpu=60GiB"]` -> `{"0": "20GiB", "cpu": "60GiB"}`; a malformed item raises ConfigError
    naming the expected form."""
    out: dict[str, str] = {}
    for item in items:
        device, sep, size = (part.strip() for part in str(item).partition("="))
        if not sep:
            raise ConfigError(f"max memory {item!r}: expected {MAX_MEMORY_FORM}")
        _check_entry(device, size, item)
        if device.lower() in out:
            raise ConfigError(f"max memory {item!r}: device {device!r} given twice")
        out[device.lower()] = size
    return out


def size_bytes(size: str) -> int:
    """`20GiB` -> 21474836480, `500MB` -> 500000000, `1024` -> 1024 (units case-insensitive)."""
    match = _SIZE.fullmatch(str(size).strip())
    if match is None:
        raise ConfigError(
            f"{size!r} is not a size; expected bytes, or a number with KiB/MiB/GiB/TiB or KB/MB/GB/TB"
        )
    number, unit, binary = match.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def _check_entry(device: str, size: str, item: str) -> None:
    if not (device.isdigit() or device.lower() in MEMORY_DEVICES):
        raise ConfigError(f"max memory {item!r}: unknown device {device!r}; expected {MAX_MEMORY_FORM}")
    if not _SIZE.fullmatch(size):
        raise ConfigError(f"max memory {item!r}: {size!r} is not a size; expected {MAX_MEMORY_FORM}")

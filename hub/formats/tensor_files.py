"""Read-only access to the tensor files SAE formats use, without unpickling: safetensors and numpy `.npz`.

Both are opened through `open_tensor_file`, which gives names, shapes and safetensors dtype codes before
any tensor is read, so a folder is validated against its config first and loaded one tensor at a time.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from hub.validate import SAEFormatError

# numpy dtype -> the safetensors code `check_tensor_dtype` understands.
_NPY_CODES = {"float64": "F64", "float32": "F32", "float16": "F16"}


class TensorFile(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype_code(self, key: str) -> str: ...
    def get(self, key: str) -> torch.Tensor: ...


class _Safetensors:
    def __init__(self, handle) -> None:
        self._f = handle

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def dtype_code(self, key: str) -> str:
        return self._f.get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)


class _Npz:
    """An `.npz` read with `allow_pickle=False`: object arrays (which would need pickle) are refused."""

    def __init__(self, data: np.lib.npyio.NpzFile, where: str) -> None:
        self._data = data
        self._where = where
        self._cache: dict[str, np.ndarray] = {}

    def _array(self, key: str) -> np.ndarray:
        if key not in self._cache:
            try:
                self._cache = {key: self._data[key]}  # keep one array: npz members are read whole
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                raise SAEFormatError(f"{self._where}: array {key} cannot be read ({exc})") from None
        return self._cache[key]

    def keys(self) -> list[str]:
        return list(self._data.files)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._array(key).shape)

    def dtype_code(self, key: str) -> str:
        dtype = self._array(key).dtype
        return _NPY_CODES.get(dtype.name, dtype.name)

    def get(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._array(key)))


@contextmanager
def open_tensor_file(path: Path) -> Iterator[TensorFile]:
    """Open `path` (`.safetensors` or `.npz`) for reading, with a format error naming it if it is unreadable."""
    if path.suffix == ".npz":
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise SAEFormatError(
                f"{path} is not a readable .npz file (expected a zip of float arrays): {exc}"
            ) from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise SAEFormatError(f"{path} holds a single array; expected an .npz archive of named arrays")
        with data:
            yield _Npz(data, str(path))
        return
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:  # a corrupt header, or a file that cannot be read
        raise SAEFormatError(f"{path} is not a readable safetensors file: {exc}") from None
    with handle as f:
        yield _Safetensors(f)

"""The opt-in converter of pickle-only SAE files (Goodfire, dictionary_learning, Qwen-Scope) to a SAELens v6
folder, after which the SAE loads like any other without pickle.

In this process, nothing is unpickled: the file's SHA-256 is checked against the one given, and every
opcode of its `data.pkl` is scanned (`pickletools.genops`, no execution) against an allow-list of the
globals a plain state dict of tensors needs. Only then a subprocess (`python -m hub.convert`) runs
`torch.load(weights_only=True)`, which is refused below torch 2.10 (CVE-2025-32434, CVE-2026-24747), maps
the keys (`hub.formats.pickled.to_saelens`) and writes the folder.
"""

from __future__ import annotations

import hashlib
import json
import pickletools
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
from packaging.version import Version

from hub.validate import SAEFormatError, read_json

MIN_TORCH = Version("2.10")
# The only globals a torch.save'd dict of tensors refers to.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    *(
        ("torch", name)
        for name in (
            "FloatStorage",
            "DoubleStorage",
            "HalfStorage",
            "BFloat16Storage",
            "LongStorage",
            "IntStorage",
            "ShortStorage",
            "CharStorage",
            "ByteStorage",
            "BoolStorage",
        )
    ),
}
# Opcodes that build objects from a class without naming an allowed global (or pull from extension
# registries): never needed by a state dict.
FORBIDDEN_OPCODES = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "BUILD"}
_STRINGS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pickle_bytes(src: Path) -> bytes:
    if not zipfile.is_zipfile(src):
        raise SAEFormatError(
            f"{src} is not a torch.save zip archive (the format since torch 1.6); legacy pickles are not converted"
        )
    with zipfile.ZipFile(src) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(names) != 1:
            raise SAEFormatError(f"{src}: expected exactly one data.pkl in the archive, found {len(names)}")
        return archive.read(names[0])


def scan_pickle(src: Path) -> None:
    """Refuse `src` unless every opcode of its pickle is allowed and every global it names is one a tensor
    state dict needs. Nothing is executed: opcodes are only decoded."""
    data = _pickle_bytes(src)
    memo: dict[int, object] = {}
    pushed: list[object] = []  # values of the recent pushes (strings; None for anything else)
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in FORBIDDEN_OPCODES:
                raise SAEFormatError(
                    f"{src}: refused: the pickle uses opcode {name}, which a state dict never needs"
                )
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                _check_global(src, module, attr)
            elif name == "STACK_GLOBAL":
                module, attr = pushed[-2:] if len(pushed) >= 2 else (None, None)
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise SAEFormatError(
                        f"{src}: refused: a STACK_GLOBAL whose names could not be read statically"
                    )
                _check_global(src, module, attr)
            if name in _STRINGS:
                pushed.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed.append(memo.get(int(arg)))
            elif opcode.stack_after:
                pushed.append(None)
    except ValueError as exc:  # genops on malformed bytes
        raise SAEFormatError(f"{src}: refused: the pickle cannot be decoded ({exc})") from None


def _check_global(src: Path, module: str, attr: str) -> None:
    if (module, attr) not in ALLOWED_GLOBALS:
        raise SAEFormatError(
            f"{src}: refused: the pickle refers to {module}.{attr}, which is not one of the globals a tensor "
            "state dict needs (torch storages, torch._utils._rebuild_tensor_v2, collections.OrderedDict)"
        )


def check_torch() -> None:
    if Version(torch.__version__.split("+")[0]) < MIN_TORCH:
        raise SAEFormatError(
            f"converting pickles needs torch >= {MIN_TORCH} (torch.load had code-execution bugs before it: "
            f"CVE-2025-32434, CVE-2026-24747); this is torch {torch.__version__}"
        )


def convert_pickle(src: str | Path, out: str | Path, sha256: str, *, allow_pickle: bool = False) -> Path:
    """Check, scan and convert one pickle-only SAE file `src` into a SAELens v6 folder `out`."""
    src, out = Path(src), Path(out)
    if not allow_pickle:
        raise SAEFormatError(
            "converting a pickle file needs the explicit opt-in --allow-pickle (allow_pickle=True)"
        )
    if not src.is_file():
        raise SAEFormatError(f"{src} is not a file; give the downloaded .pt/.pth file to convert")
    if out.exists() and any(out.iterdir()):
        raise SAEFormatError(f"{out} exists and is not empty; give a new folder for the converted SAE")
    check_torch()
    expected = sha256.strip().lower()
    actual = sha256_of(src)
    if actual != expected:
        raise SAEFormatError(f"{src}: SHA-256 is {actual}, but {expected} was given; refusing to convert it")
    scan_pickle(src)
    proc = subprocess.run(
        [sys.executable, "-m", "hub.convert", str(src), str(out)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        raise SAEFormatError(f"converting {src} failed: {lines[-1]}")
    return out


def _child(src: Path, out: Path) -> None:
    """Runs in the subprocess: the only place a pickle is loaded, with weights_only=True."""
    from hub.formats.pickled import to_saelens
    from hub.sae_io import save_sae
    from steer.sae import build_sae, dtype_name

    check_torch()
    state = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise SAEFormatError(f"{src}: expected a state dict (names -> tensors), got {type(state).__name__}")
    side = src.parent / "config.json"
    cfg, tensors = to_saelens(state, src, read_json(side) if side.is_file() else None)
    cfg.metadata["converted_sha256"] = sha256_of(src)
    sae = build_sae(replace(cfg, dtype=dtype_name(tensors["W_enc"].dtype)))
    sae.load_state_dict({k: v.to(sae.dtype).contiguous() for k, v in tensors.items()}, strict=True)
    save_sae(sae, out)


if __name__ == "__main__":
    try:
        _child(Path(sys.argv[1]), Path(sys.argv[2]))
    except SAEFormatError as exc:
        print(json.dumps(str(exc)), file=sys.stderr)
        sys.exit(1)

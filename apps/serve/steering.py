"""The server's SAEs by name, its default spec, and a request's `steering` field as compiled specs.

A request's `steering` is the intervention JSON of `fast-steer chat --spec` (one object or a list), except
that its `sae` is the NAME of an SAE the server was started with (`--sae NAME=REF`): a client can never
make the server read a path or fetch from the Hub. Specs are checked against their SAE and the model
(`SteeredModel.compile`), and compiled ones are kept, keyed by their normalised JSON, so identical specs
from different requests share one `steer()` block of a batch. The counts (specs per request, edits per
spec) are checked before anything is parsed, and the kept specs are bounded by their tensors' bytes.
`parse` compiles on the caller's thread: the app calls it off the event loop.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apps.serve.errors import APIError
from apps.serve.labels import describe_labels
from apps.serve.schemas import Limits
from hub.registry import neuronpedia_source
from steer import SAE, Intervention, SpecError, SteeredModel
from steer.errors import ConfigError
from steer.hooks import CompiledIntervention


@dataclass(frozen=True)
class NamedSAE:
    """An SAE loaded at start, the name requests use for it, and its top special-token features if known."""

    name: str
    sae: SAE
    top_features: tuple[dict[str, Any], ...] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "sae",
            "layer": self.sae.layer,
            "d_in": self.sae.d_in,
            "d_sae": self.sae.d_sae,
            "architecture": self.sae.cfg.architecture,
            "top_features": None if self.top_features is None else list(self.top_features),
            "labels": describe_labels(self.sae.labels),
            "neuronpedia": neuronpedia_source(self.sae.metadata),
        }


@dataclass(frozen=True)
class RowSpec:
    """A checked steering field: the compiled specs and their normalised JSON (`sae` as a name)."""

    key: str
    data: tuple[dict[str, Any], ...]
    compiled: tuple[CompiledIntervention, ...]

    @property
    def nbytes(self) -> int:
        return sum(compiled_bytes(c) for c in self.compiled)


def compiled_bytes(compiled: CompiledIntervention) -> int:
    """An estimate of the tensor bytes a compiled spec holds: its added vector, and for latent edits the
    decoder rows and offset plus as many bytes again for the encoder columns its feature encoder keeps."""
    total = 0 if compiled.add_vector is None else _nbytes(compiled.add_vector)
    if compiled.latent is not None:
        total += 2 * _nbytes(compiled.latent.W_delta) + _nbytes(compiled.latent.offset)
    return total


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Steering:
    """Named SAEs, the default spec, and request steering fields turned into `RowSpec`s (400 when bad)."""

    def __init__(
        self,
        sm: SteeredModel,
        saes: list[NamedSAE],
        limits: Limits,
        check: Callable[[CompiledIntervention], None] | None = None,
    ) -> None:
        """`check`: the engine's own test of a compiled spec (raising `SpecError` for what it cannot steer)."""
        self.sm = sm
        self.limits = limits
        self.check = check
        self.saes = {s.name: s for s in saes}
        if len(self.saes) != len(saes):
            raise ConfigError(f"SAE names must be unique, got {[s.name for s in saes]}")
        self._compiled: OrderedDict[str, RowSpec] = OrderedDict()
        self._compiled_bytes = 0
        self._lock = threading.Lock()
        self.default: RowSpec | None = None

    def parse(self, value: Any, param: str = "steering") -> RowSpec | None:
        """`value` (an intervention mapping, a list of them, or None for plain) checked and compiled."""
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        if not items:
            return None
        wheres = [f"{param}[{i}]" for i in range(len(items))] if isinstance(value, list) else [param]
        self._check_counts(items, wheres, param)
        specs = [self._intervention(item, where) for item, where in zip(items, wheres, strict=True)]
        # the names, not the SAEs' own references
        data = [spec.with_sae(item["sae"]).to_dict() for spec, item in zip(specs, items, strict=True)]
        key = json.dumps(data, sort_keys=True)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        compiled = []
        for spec, where in zip(specs, wheres, strict=True):
            try:
                compiled.append(self.sm.compile(spec))
                if self.check is not None:
                    self.check(compiled[-1])
            except SpecError as exc:
                raise APIError.bad_request(f"{where}: {exc}", where) from None
        row_spec = RowSpec(key, tuple(data), tuple(compiled))
        size = row_spec.nbytes
        with self._lock:
            if key not in self._compiled and size <= self.limits.max_compiled_bytes:
                self._compiled[key] = row_spec
                self._compiled_bytes += size
                while self._compiled_bytes > self.limits.max_compiled_bytes:
                    self._compiled_bytes -= self._compiled.popitem(last=False)[1].nbytes
        return row_spec

    @property
    def cached_bytes(self) -> int:
        """Tensor bytes of the compiled specs kept for reuse (at most `Limits.max_compiled_bytes`)."""
        with self._lock:
            return self._compiled_bytes

    def _check_counts(self, items: list, wheres: list[str], param: str) -> None:
        """400 for more interventions, or more edits in one, than the limits allow (before any parsing)."""
        limits = self.limits
        if len(items) > limits.max_specs_per_request:
            raise APIError.over_limit(
                f"the number of interventions in {param}",
                len(items),
                limits.max_specs_per_request,
                "--max-specs-per-request",
                param,
            )
        for item, where in zip(items, wheres, strict=True):
            edits = item.get("edits") if isinstance(item, dict) else None
            if isinstance(edits, list) and len(edits) > limits.max_edits_per_spec:
                raise APIError.over_limit(
                    f"the number of edits in {where}",
                    len(edits),
                    limits.max_edits_per_spec,
                    "--max-edits-per-spec",
                    f"{where}.edits",
                )

    def _intervention(self, item: Any, where: str) -> Intervention:
        if not isinstance(item, dict):
            raise APIError.bad_request(
                f"{where} must be an intervention object, got {type(item).__name__}", where
            )
        name = item.get("sae")
        if not isinstance(name, str) or name not in self.saes:
            loaded = ", ".join(sorted(self.saes)) or "none"
            raise APIError.bad_request(
                f"{where}.sae must name an SAE this server was started with (loaded: {loaded}); got "
                f"{json.dumps(name)}. The server never reads SAE paths or Hub ids from a request: "
                "start it with --sae NAME=REF and use NAME",
                f"{where}.sae",
            )
        try:
            return Intervention.from_dict(item, sae=self.saes[name].sae)
        except SpecError as exc:
            raise APIError.bad_request(f"{where}: {exc}", where) from None

    def resolve(self, value: Any, given: bool) -> RowSpec | None:
        """A request's spec: its own `steering` field when `given` (null: plain), else the server's default."""
        return self.parse(value) if given else self.default

    def describe_default(self) -> list[dict[str, Any]] | None:
        return None if self.default is None else list(self.default.data)

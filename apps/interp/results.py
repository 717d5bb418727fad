"""Reopen what `fast-steer interp run` wrote for one SAE: `RunResults.open(sae_dir, run_dir)`.

The run folder holds `interp.json` and, under `collections/<key>/` (the key is recorded in
`settings.collection.folder`), the activation collection it scored. The dashboards and the Neuronpedia export
read both through this one place, with the SAE itself (checked against the collection by its digest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps.interp.run import INTERP_FILE
from steer.errors import ConfigError, MissingFileError
from steer.sae import SAE
from train.interp.collection import Collection

COLLECTIONS = "collections"  # the sub-folder of a run folder that `run_interp` collects into by default


@dataclass
class RunResults:
    """An SAE, the collection of its activation examples, and the run's `interp.json`."""

    sae_folder: Path
    run_dir: Path
    sae: SAE
    collection: Collection
    interp: dict[str, Any]

    @classmethod
    def open(cls, sae_dir: str | Path, run_dir: str | Path) -> RunResults:
        """Read `run_dir/interp.json`, reopen its collection (refused when made from another SAE) and load
        the SAE in `sae_dir` on the CPU."""
        from hub.sae_io import load_sae, resolve_sae_folder

        sae_folder, run_dir = resolve_sae_folder(sae_dir), Path(run_dir)
        path = run_dir / INTERP_FILE
        if not path.is_file():
            raise MissingFileError(
                f"no {INTERP_FILE} in {run_dir}: give the --out folder of `fast-steer interp run`"
            )
        try:
            interp = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        key = ((interp.get("settings") or {}).get("collection") or {}).get("folder")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{path}: field 'settings.collection.folder' (the collection's key) is missing")
        collection = Collection.open(run_dir / COLLECTIONS / key, sae=sae_folder)
        sae = load_sae(sae_folder)
        if sae.d_sae != collection.d_sae:
            raise ConfigError(
                f"the SAE in {sae_folder} has {sae.d_sae} features, its collection {collection.d_sae}"
            )
        return cls(sae_folder, run_dir, sae, collection, interp)

    @property
    def scored(self) -> dict[int, dict[str, Any]]:
        """The run's entry (`interp.json` `features[]`) per scored feature."""
        return {f["feature"]: f for f in self.interp.get("features") or [] if isinstance(f, dict)}

    @property
    def judge_model(self) -> str | None:
        return ((self.interp.get("settings") or {}).get("judge") or {}).get("model")

    def label(self, feature: int) -> str | None:
        """The run's name for `feature` (its rubric name, else its explanation), else the SAE folder's default
        labelling's label, else None."""
        entry = self.scored.get(feature) or {}
        for key in ("name", "explanation"):
            if isinstance(entry.get(key), str) and entry[key].strip():
                return entry[key]
        return None if self.sae.labels is None else self.sae.labels.get(feature)

    def select(self, features: list[int] | None) -> list[int]:
        """`features` checked against the collection (each must have fired: a card needs examples), or every
        feature that fired, ascending."""
        live = self.collection.live_features().tolist()
        if features is None:
            return live
        d_sae = self.collection.d_sae
        beyond = [f for f in features if not 0 <= f < d_sae]
        if beyond:
            raise ConfigError(f"feature(s) {beyond[:5]} out of range: the SAE has features 0..{d_sae - 1}")
        firing = set(live)
        silent = [f for f in features if f not in firing]
        if silent:
            raise ConfigError(
                f"feature(s) {silent[:5]} never fire in the collection of {self.run_dir} ({len(live)} of "
                f"{d_sae} features do), so there is nothing to show for them"
            )
        return sorted(set(features))


def parse_feature_list(text: str) -> list[int]:
    """`"3,17,40-45"` as [3, 17, 40, 41, 42, 43, 44, 45] (ConfigError naming the bad item)."""
    out: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        low, dash, high = item.partition("-")
        if not (low.isdigit() and (not dash or high.isdigit())):
            raise ConfigError(f"--features: {item!r} is not a feature index or a range a-b (e.g. 3,17,40-45)")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ConfigError(f"--features: the range {item!r} runs backwards")
        out.extend(range(first, last + 1))
    return out

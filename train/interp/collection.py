"""Read a finished activation collection: `Collection.open(folder, sae=...)`, then per feature its examples.

`feature(f)` gives the top windows (strongest first, one per conversation, identical contexts once) and a
seeded sample of windows per activation decile; `negatives` and `hard_negatives` give windows where the
feature is 0 on every token. All windows of one call are distinct examples: no two share a `Window.key`
and no two overlap in a conversation (identical conversations count as one), so a scorer can split them into
disjoint train and test sets.
Windows are computed on demand from the per-feature index (`train.interp.store`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

from steer.errors import ConfigError, FastSteerError, MissingFileError
from steer.sae import SAE
from train.interp import store
from train.interp.examples import FeatureExamples, Window
from train.interp.identity import sae_identity

N_DECILES = 10
TRIES_PER_WINDOW = 50  # rejected candidates allowed per wanted window before a list is left shorter


class CollectionMismatchError(FastSteerError, ValueError):
    """A collection was made from another SAE than the one it is used with."""


@dataclass(frozen=True)
class ExampleConfig:
    """How windows are cut from a collection (changing it needs no new collection)."""

    window: int = 32  # tokens on each side of the peak (clipped at the conversation's ends)
    top_k: int = 20  # top activating windows per feature
    per_decile: int = 5  # sampled windows per activation decile
    seed: int = 0  # seeds the decile and negative samples (together with the feature index)

    def __post_init__(self) -> None:
        if self.window < 0 or self.top_k < 0 or self.per_decile < 0:
            raise ConfigError(f"window, top_k and per_decile must be >= 0, got {self}")


class Collection:
    """A finished collection folder (`OUT/<key>/`); see `train.interp.collect.collect_examples`."""

    def __init__(self, folder: Path, manifest: dict[str, Any], examples: ExampleConfig):
        self.folder, self.manifest, self.examples = folder, manifest, examples
        tokens = load_file(str(folder / store.TOKENS))
        self.token_ids: np.ndarray = tokens["token_ids"]
        self.special: np.ndarray = tokens["special"].astype(bool)
        self.offsets: np.ndarray = tokens["offsets"]
        self.conversation_of: np.ndarray = np.repeat(
            np.arange(len(self.offsets) - 1, dtype=np.int32), np.diff(self.offsets)
        )
        first: dict[bytes, int] = {}
        self.canonical = np.array(  # a conversation's first identical copy: duplicates count as one
            [
                first.setdefault(self.token_ids[a:b].tobytes(), i)
                for i, (a, b) in enumerate(zip(self.offsets[:-1], self.offsets[1:], strict=True))
            ],
            dtype=np.int64,
        )
        index = load_file(str(folder / store.INDEX))  # small arrays only: entries are read per feature
        self.feature_ptr: np.ndarray = index["feature_ptr"]
        self.count: np.ndarray = index["count"]
        self.max: np.ndarray = index["max"]
        self.histogram: np.ndarray = index["histogram"]
        vocab = json.loads((folder / store.VOCAB).read_text(encoding="utf-8"))
        self.vocab: dict[int, str] = {int(k): v for k, v in vocab.items()}
        skip_first = manifest["settings"]["skip_first"]
        self.measured = np.ones(len(self.token_ids), dtype=bool)  # positions whose activation was encoded
        if skip_first:
            self.measured[self.offsets[:-1]] = False

    @classmethod
    def open(
        cls,
        folder: str | Path,
        *,
        sae: SAE | str | Path | dict[str, Any] | None = None,
        examples: ExampleConfig | None = None,
    ) -> Collection:
        """Open a finished collection; with `sae` (an SAE, its folder or its `sae_identity`), refuse one made
        from another SAE (CollectionMismatchError)."""
        folder = Path(folder)
        path = folder / store.MANIFEST
        if not path.is_file():
            raise MissingFileError(
                f"{folder} holds no finished activation collection (no {store.MANIFEST}); "
                "run `fast-steer interp collect` (an unfinished one resumes)"
            )
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format_version") != store.FORMAT_VERSION:
            raise ConfigError(
                f"{path}: format_version {manifest.get('format_version')!r}, expected {store.FORMAT_VERSION}; "
                "collect again"
            )
        if sae is not None:
            given = sae if isinstance(sae, dict) else sae_identity(sae)
            made = manifest["sae"]
            if given["digest"] != made["digest"]:
                raise CollectionMismatchError(
                    f"{folder} was collected from the SAE in {made['folder']} (weights sha256 "
                    f"{made['weights_sha256'][:12]}, cfg sha256 {made['cfg_sha256'][:12]}), not from the SAE in "
                    f"{given['folder']} (weights sha256 {given['weights_sha256'][:12]}, cfg sha256 "
                    f"{given['cfg_sha256'][:12]}); collect examples for that SAE instead"
                )
        return cls(folder, manifest, examples or ExampleConfig())

    # -- sizes and statistics -------------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return len(self.count)

    @property
    def n_conversations(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        """Tokens stored (position 0 included)."""
        return len(self.token_ids)

    @property
    def tokens_counted(self) -> int:
        """Tokens the statistics count (position 0 left out with `skip_first`)."""
        return int(self.measured.sum())

    @property
    def density(self) -> np.ndarray:
        """Per feature, the share of counted tokens on which it fires (> 0)."""
        return self.count / max(self.tokens_counted, 1)

    def live_features(self) -> np.ndarray:
        """Indices of the features that fire at least once."""
        return np.flatnonzero(self.count > 0)

    def entries(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices ascending, float32 activations) of the tokens where `feature` fires."""
        self._check(feature)
        a, b = int(self.feature_ptr[feature]), int(self.feature_ptr[feature + 1])
        with safe_open(str(self.folder / store.INDEX), framework="np") as fh:
            index = fh.get_slice("token_index")[a:b].astype(np.int64)
            values = fh.get_slice("values")[a:b].astype(np.float32)
        return index, values

    # -- examples -------------------------------------------------------------------------------
    def feature(self, feature: int) -> FeatureExamples:
        """Top windows, decile samples, density and histogram of `feature`.

        Top windows: the strongest firing tokens, one window per conversation, each the largest activation
        of its window and a new example (`Window.key`): a conversation whose strongest token repeats an
        example already taken (the same default system prompt) shows its next strongest one instead.
        """
        cfg = self.examples
        index, values = self.entries(feature)
        bins = self.histogram.shape[1]
        peak = float(self.max[feature])
        chosen = _Chosen(self.canonical)
        top: list[Window] = []
        if len(index):
            conversation = self.canonical[self.conversation_of[index]]
            used = np.zeros(self.n_conversations, dtype=bool)
            tries = cfg.top_k * TRIES_PER_WINDOW
            for p in np.argsort(-values, kind="stable").tolist():  # strongest token first
                if len(top) >= cfg.top_k or tries == 0:
                    break
                if used[conversation[p]]:
                    continue
                window = self._window(int(index[p]), index, values)
                if window.max_activation <= values[p] and chosen.take(window):
                    top.append(window)
                    used[conversation[p]] = True
                else:
                    tries -= 1
        edges = np.quantile(values, np.linspace(0, 1, N_DECILES + 1)) if len(values) else np.zeros(0)
        deciles = self._deciles(feature, index, values, edges, chosen)
        peaks = Counter(w.tokens[w.peak] for w in top)
        return FeatureExamples(
            feature=feature,
            top=top,
            deciles=deciles,
            density=float(self.density[feature]),
            max_activation=peak,
            histogram_edges=np.linspace(0.0, peak, bins + 1).tolist(),
            histogram_counts=self.histogram[feature].tolist(),
            top_token_counts=dict(peaks.most_common()),
            count=int(self.count[feature]),
            decile_edges=edges.tolist(),
        )

    def _deciles(
        self, feature: int, index: np.ndarray, values: np.ndarray, edges: np.ndarray, chosen: _Chosen
    ) -> list[list[Window]]:
        """Per decile of the firing activations, up to `per_decile` windows whose peak lies in it and is
        the largest activation of its window; a seeded sample."""
        out: list[list[Window]] = [[] for _ in range(N_DECILES)]
        if not len(values):
            return out
        want = self.examples.per_decile
        rng = np.random.default_rng([self.examples.seed, feature])
        decile = np.searchsorted(edges[1:-1], values, side="right")
        for q in range(N_DECILES):
            candidates = np.flatnonzero(decile == q)
            rng.shuffle(candidates)
            for p in candidates[: want * TRIES_PER_WINDOW]:
                if len(out[q]) >= want:
                    break
                window = self._window(int(index[p]), index, values)
                if window.max_activation <= values[p] and chosen.take(window):
                    out[q].append(window)
        return out

    def negatives(self, feature: int, n: int, seed: int = 0) -> list[Window]:
        """Up to `n` random windows on which `feature` is 0 everywhere (fewer for a very dense feature)."""
        index, values = self.entries(feature)
        rng = np.random.default_rng([seed, feature, 1])
        candidates = np.flatnonzero(self.measured)
        rng.shuffle(candidates)
        return self._zero_windows(
            candidates[: max(n, 1) * TRIES_PER_WINDOW], index, values, n, _Chosen(self.canonical)
        )

    def hard_negatives(
        self, feature: int, n: int, seed: int = 0, neighbour: int | None = None
    ) -> list[Window]:
        """Up to `n` windows on which `feature` is 0 everywhere: centred on the tokens it peaks on most (its
        top windows' peak tokens, most common first); with `neighbour` (the decoder-nearest feature), half of
        them on that feature's strongest activations instead; then on chat-template special tokens."""
        top = self.feature(feature).top
        targets = [token for token, _ in Counter(w.token_ids[w.peak] for w in top).most_common()]
        index, values = self.entries(feature)
        rng = np.random.default_rng([seed, feature, 2])
        chosen, out = _Chosen(self.canonical), []
        pools = [np.flatnonzero((self.token_ids == t) & self.measured) for t in targets]
        for pool in pools:
            rng.shuffle(pool)
        special = np.flatnonzero(self.special & self.measured & ~np.isin(self.token_ids, targets))
        rng.shuffle(special)
        quotas = [(pools, n if neighbour is None else n - n // 2)]
        if neighbour is not None:
            self._check(neighbour)
            near_index, near_values = self.entries(neighbour)
            quotas.append(([near_index[np.argsort(-near_values, kind="stable")]], n))
        quotas.append(([*pools, special], n))
        for candidates, quota in quotas:
            for pool in candidates:
                if len(out) >= quota:
                    break
                out += self._zero_windows(pool, index, values, quota - len(out), chosen)
        return out

    def _zero_windows(
        self, centres: np.ndarray, index: np.ndarray, values: np.ndarray, n: int, chosen: _Chosen
    ) -> list[Window]:
        """Windows around `centres` (in order) with no firing token, up to `n`."""
        starts, ends = self._bounds(centres)
        empty = np.searchsorted(index, starts) == np.searchsorted(index, ends)
        out: list[Window] = []
        for centre in centres[empty]:
            if len(out) >= n:
                break
            window = self._window(int(centre), index, values)
            if chosen.take(window):
                out.append(window)
        return out

    # -- windows --------------------------------------------------------------------------------
    def _bounds(self, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[start, end) token ranges of the windows around `centres`, clipped to their conversations."""
        conversation = self.conversation_of[centres]
        radius = self.examples.window
        starts = np.maximum(self.offsets[conversation], centres - radius)
        ends = np.minimum(self.offsets[conversation + 1], centres + radius + 1)
        return starts, ends

    def _window(self, centre: int, index: np.ndarray, values: np.ndarray) -> Window:
        """The window around token `centre`, with the activations given by (`index`, `values`)."""
        starts, ends = self._bounds(np.array([centre]))
        start, end = int(starts[0]), int(ends[0])
        activations = np.zeros(end - start, dtype=np.float32)
        lo, hi = np.searchsorted(index, [start, end])
        activations[index[lo:hi] - start] = values[lo:hi]
        ids = self.token_ids[start:end].tolist()
        conversation = int(self.conversation_of[centre])
        return Window(
            conversation=conversation,
            start=start - int(self.offsets[conversation]),
            token_ids=tuple(ids),
            tokens=tuple(self.vocab[t] for t in ids),
            activations=tuple(activations.tolist()),
            special=tuple(self.special[start:end].tolist()),
            peak=centre - start,
        )

    def _check(self, feature: int) -> None:
        if not 0 <= feature < self.d_sae:
            raise ConfigError(f"feature {feature} out of range: the SAE has features 0..{self.d_sae - 1}")


class _Chosen:
    """The windows already taken for one feature: a new one must have a new key and overlap none (in its
    conversation or any identical copy of it, `canonical`)."""

    def __init__(self, canonical: np.ndarray) -> None:
        self.canonical = canonical
        self.keys: set[tuple[int, ...]] = set()
        self.spans: dict[int, list[tuple[int, int]]] = {}

    def take(self, window: Window) -> bool:
        """Record `window` and return True if it is a new, non-overlapping example; else False."""
        start, end = window.start, window.start + len(window.token_ids)
        spans = self.spans.setdefault(int(self.canonical[window.conversation]), [])
        if window.key in self.keys or any(s < end and start < e for s, e in spans):
            return False
        self.keys.add(window.key)
        spans.append((start, end))
        return True


def windows_of(examples: FeatureExamples) -> Iterable[Window]:
    """Every window of `examples`: the top ones, then the deciles lowest first."""
    yield from examples.top
    for windows in examples.deciles:
        yield from windows

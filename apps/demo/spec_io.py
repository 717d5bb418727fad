"""The page's intervention table as `steer.Intervention` specs, and back.

Edits with the same positions form one Intervention on the chosen SAE. The page's strengths are on the
study's scale (`apps.evaluation.primitives`): an `add` of strength s adds `added_norm(s, R)`, R being the
SAE's layer's strength-scale norm, and that added norm is what a spec holds. Export writes
`{"interventions": [...], "metadata": {"strength_scale": ...}}` (what `steer.load_interventions`,
`fast-steer chat --spec` and `fast-steer lm-eval` read), the metadata stating R and each `add` edit's
strength s. Import converts back with the demo's own R and never loads an SAE: the spec's `sae`
reference must name one the server was started with.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from apps.demo.edits import EditRow
from apps.demo.settings import DemoInputError
from apps.evaluation.primitives import SCALE_STATISTIC, added_norm, scale_note, strength_of
from steer.spec import Edit, Intervention, SAERef, SpecError, dump_interventions, sae_ref_key

if TYPE_CHECKING:
    from apps.demo.backend import DemoSAE


def build_interventions(sae: DemoSAE, rows: list[EditRow]) -> list[Intervention]:
    """One Intervention per distinct `positions` among `rows`, in order of first appearance."""
    groups: dict[str, list[Edit]] = {}
    for row in rows:
        strength = added_norm(row.strength, sae.residual_norm) if row.op == "add" else row.strength
        groups.setdefault(row.positions, []).append(Edit(row.feature, row.op, strength))
    return [
        Intervention(layer=sae.layer, sae=sae.sae, edits=edits, positions=positions)
        for positions, edits in groups.items()
    ]


def export_spec(sae: DemoSAE, rows: list[EditRow]) -> str:
    """JSON of the interventions (one per position mode) with the strength scale they were made on."""
    if not rows:
        raise DemoInputError("the intervention has no edits yet: add a feature edit before exporting")
    return dump_interventions(build_interventions(sae, rows), {"strength_scale": strength_scale(sae, rows)})


def strength_scale(sae: DemoSAE, rows: list[EditRow]) -> dict[str, Any]:
    """The exported spec's statement of its scale: R, how it was measured, each `add` edit's strength s."""
    if sae.sample is None:
        rule = "the demo had no sample conversations to measure R on: strength s adds s/100 (R = 1)"
    else:
        rule = scale_note(sae.residual_norm, sae.layer, len(sae.sample.token_ids))
    return {
        "norm": sae.residual_norm,
        "statistic": SCALE_STATISTIC if sae.sample is not None else None,
        "rule": rule,
        "add_strengths": [
            {"feature": r.feature, "positions": r.positions, "strength": r.strength}
            for r in rows
            if r.op == "add"
        ],
    }


def import_spec(text: str, saes: list[DemoSAE]) -> tuple[str, list[EditRow]]:
    """(name of the loaded SAE the spec refers to, its edits as rows) of spec JSON from the page."""
    if not (text or "").strip():
        raise DemoInputError('paste a spec JSON first (an object, a list, or {"interventions": [...]})')
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DemoInputError(f"the spec is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "interventions" in data:
        data = data["interventions"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise DemoInputError("the spec holds no interventions")
    by_key = {sae_ref_key(s.ref): s for s in saes}
    chosen: DemoSAE | None = None
    rows: list[EditRow] = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DemoInputError(f"intervention {i} must be a JSON object, got {type(item).__name__}")
        sae = by_key.get(_ref_key(_parse(item, i).sae, i))
        if sae is None:
            loaded = "; ".join(f"{s.name}: {json.dumps(s.ref)}" for s in saes)
            raise DemoInputError(
                f"intervention {i} uses SAE {json.dumps(item.get('sae'))}, which this demo was not started "
                f"with (the page cannot load SAEs). Loaded: {loaded}. Restart with --sae to use another."
            )
        if chosen is not None and sae is not chosen:
            raise DemoInputError("the demo steers with one SAE at a time; this spec uses several")
        chosen = sae
        spec = _parse(item, i, sae)
        if spec.layer != sae.layer:
            raise DemoInputError(
                f"intervention {i} is for layer {spec.layer} but SAE {sae.name} reads layer {sae.layer}"
            )
        if not isinstance(spec.positions, str):
            raise DemoInputError(
                f"intervention {i} lists explicit position tokens {spec.positions}; the demo supports the modes "
                "special / all / prompt / generated (use `fast-steer chat --spec` for token lists)"
            )
        rows += [
            EditRow(e.feature, e.op, _page_strength(e, sae.residual_norm), spec.positions) for e in spec.edits
        ]
    return chosen.name, rows  # items is non-empty, so an SAE was chosen


def _parse(item: dict[str, Any], i: int, sae: DemoSAE | None = None) -> Intervention:
    """Intervention `i` of an imported spec; every field is checked (the `sae` reference's shape too, without
    loading it) and a malformed one is named in a `DemoInputError`. With `sae`, it uses that loaded SAE."""
    try:
        return Intervention.from_dict(item, sae=None if sae is None else sae.sae)
    except SpecError as exc:
        raise DemoInputError(f"intervention {i}: {exc}") from None


def _ref_key(ref: SAERef, i: int) -> str:
    """`sae_ref_key` of a well-formed reference, whose folder may still be one the system cannot name."""
    try:
        return sae_ref_key(ref)
    except (OSError, ValueError) as exc:
        raise DemoInputError(
            f"intervention {i}: field 'sae' is not a usable folder or Hub reference: {exc}"
        ) from None


def _page_strength(edit: Edit, norm: float) -> float:
    """An edit's strength on the page's scale: `add` edits from added norm to s, the others unchanged."""
    return round(strength_of(edit.strength, norm), 6) if edit.op == "add" else edit.strength

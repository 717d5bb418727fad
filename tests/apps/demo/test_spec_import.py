"""A malformed imported spec gives a message naming the field, never a KeyError / AttributeError / TypeError."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gradio")
from apps.demo.backend import DemoSAE  # noqa: E402
from apps.demo.settings import DemoInputError  # noqa: E402
from apps.demo.spec_io import import_spec  # noqa: E402
from hub import load_sae, save_sae  # noqa: E402
from steer.sae import SAEConfig, build_sae  # noqa: E402


@pytest.fixture(scope="module")
def demo_sae(tmp_path_factory) -> DemoSAE:
    folder = tmp_path_factory.mktemp("import") / "sae"
    save_sae(
        build_sae(
            SAEConfig("standard", d_in=8, d_sae=16, metadata={"hook_name": "blocks.1.hook_resid_post"})
        ),
        folder,
    )
    return DemoSAE("tiny", load_sae(folder))


def _good(demo_sae: DemoSAE) -> dict:
    return {"layer": 1, "sae": demo_sae.ref, "edits": [{"feature": 2, "op": "add", "strength": 1.0}]}


CASES = {
    "sae a number": ({"sae": 5}, "sae must be"),
    "sae a list": ({"sae": ["a", "b"]}, "sae must be"),
    "sae null": ({"sae": None}, "sae must be"),
    "sae an empty mapping": ({"sae": {}}, "SAE reference needs exactly one of 'path' or 'repo'"),
    "sae path a number": ({"sae": {"path": 5}}, "SAE reference values must be strings"),
    "sae unknown key": ({"sae": {"repo": "a/b", "branch": "x"}}, r"unknown SAE reference keys \['branch'\]"),
    "sae with a null byte": ({"sae": "sae\x00"}, "field 'sae' is not a usable folder"),
    "sae missing": ({"sae": "<drop>"}, "missing sae"),
    "layer a string": ({"layer": "one"}, "layer must be a non-negative int"),
    "edits a mapping": ({"edits": {"feature": 1}}, "'edits' must be a list"),
    "edit a number": ({"edits": [3]}, "edits must be Edit objects or mappings"),
    "feature a string": (
        {"edits": [{"feature": "x", "op": "add"}]},
        "edit feature must be a non-negative int",
    ),
    "feature out of range": ({"edits": [{"feature": 99, "op": "add"}]}, r"features \[99\] are out of range"),
    "op unknown": ({"edits": [{"feature": 1, "op": "boost"}]}, "unknown edit op 'boost'"),
    "strength a list": ({"edits": [{"feature": 1, "strength": [1]}]}, "edit strength must be a number"),
    "positions a number": ({"positions": 5}, "positions must be one of"),
    "unknown key": ({"colour": "red"}, r"unknown intervention keys \['colour'\]"),
}


@pytest.mark.parametrize(("change", "message"), CASES.values(), ids=CASES.keys())
def test_malformed_field_is_named(demo_sae, change, message):
    item = {**_good(demo_sae), **change}
    item = {k: v for k, v in item.items() if v != "<drop>"}
    with pytest.raises(DemoInputError, match=message) as caught:
        import_spec(json.dumps({"interventions": [_good(demo_sae), item]}), [demo_sae])
    assert str(caught.value).startswith("intervention 2")


@pytest.mark.parametrize("text", ["5", "[[]]", '{"interventions": null}', '"spec"'])
def test_not_an_object(demo_sae, text):
    with pytest.raises(DemoInputError, match="intervention 1 must be a JSON object"):
        import_spec(text, [demo_sae])


def test_well_formed_spec_imports(demo_sae):
    name, rows = import_spec(json.dumps(_good(demo_sae)), [demo_sae])
    assert name == "tiny" and [(r.feature, r.op, r.positions) for r in rows] == [(2, "add", "special")]

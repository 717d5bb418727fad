"""Intervention spec: validation errors with clear messages, and dict / JSON / YAML / file round trips."""

from __future__ import annotations

import json

import pytest
import torch

from steer import Edit, Intervention, SpecError, SteeredModel, load_interventions
from steer.spec import dump_interventions
from tests.conftest import build_tiny_model
from tests.steer.helpers import random_sae


def _spec_dict(**over):
    data = {
        "layer": 2,
        "sae": {"repo": "someone/saes", "sae_id": "layer_2"},
        "edits": [
            {"feature": 5, "op": "add", "strength": 3.5},
            {"feature": 7, "op": "ablate", "strength": 0.0},
        ],
        "positions": "special",
    }
    data.update(over)
    return data


def test_dict_json_yaml_round_trips():
    spec = Intervention.from_dict(_spec_dict(positions=["<|im_start|>", 198]))
    assert spec.edits == [Edit(5, "add", 3.5), Edit(7, "ablate", 0.0)]
    assert Intervention.from_json(spec.to_json()) == spec
    assert Intervention.from_yaml(spec.to_yaml()) == spec
    assert spec.to_dict() == _spec_dict(positions=["<|im_start|>", 198])
    assert isinstance(spec.sae, dict), "parsing never loads the SAE"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"edits": [{"feature": 1, "op": "boost", "strength": 1.0}]}, "unknown edit op 'boost'"),
        ({"edits": [{"feature": -1}]}, "non-negative int"),
        ({"edits": [{"feature": 1, "strength": "big"}]}, "strength must be a number"),
        ({"edits": [{"feature": 1, "strength": float("inf")}]}, "must be finite"),
        ({"edits": [{"feature": 1, "colour": "red"}]}, "unknown edit keys"),
        ({"edits": [{"feature": 1, "op": "scale"}, {"feature": 1, "op": "set"}]}, "several scale/set/ablate"),
        ({"edits": {"feature": 1}}, "'edits' must be a list"),
        ({"positions": "everywhere"}, "positions='everywhere' is not a mode"),
        ({"positions": []}, "non-empty list"),
        ({"positions": [1.5]}, "token strings or non-negative ids"),
        ({"layer": -1}, "layer must be a non-negative int"),
        ({"layer": "3"}, "layer must be a non-negative int"),
        ({"sae": 42}, "sae must be a loaded steer.SAE"),
        ({"sae": {"repo": "a/b", "path": "x"}}, "exactly one of 'path' or 'repo'"),
        ({"sae": {"url": "x"}}, "unknown SAE reference keys"),
        ({"strength": 3}, "unknown intervention keys"),
    ],
)
def test_validation_errors(change, message):
    with pytest.raises(SpecError, match=message):
        Intervention.from_dict(_spec_dict(**change))


def test_missing_keys_and_bad_text():
    with pytest.raises(SpecError, match="missing layer"):
        Intervention.from_dict({"sae": "x"})
    with pytest.raises(SpecError, match="not valid JSON"):
        Intervention.from_json("{layer: 1")
    with pytest.raises(SpecError, match="not valid YAML"):
        Intervention.from_yaml("layer: [1")


def test_feature_out_of_range_for_loaded_sae():
    sae = random_sae(64, d_sae=32)
    with pytest.raises(SpecError, match=r"features \[32, 40\] are out of range for an SAE with d_sae=32"):
        Intervention(layer=0, sae=sae, edits=[Edit(32), Edit(40, "scale", 2.0), Edit(3)])


def test_model_checks_at_steer_entry(chatml_tokenizer):
    model = build_tiny_model("llama", len(chatml_tokenizer), n_layers=2)
    sm = SteeredModel(model, chatml_tokenizer)
    with (
        pytest.raises(SpecError, match="layer 5 is out of range for a model with 2 layers"),
        sm.steer(Intervention(layer=5, sae=random_sae(64), edits=[Edit(0)])),
    ):
        pass
    with (
        pytest.raises(SpecError, match="d_in=32 but the model's hidden size is 64"),
        sm.steer(Intervention(layer=1, sae=random_sae(32), edits=[Edit(0)])),
    ):
        pass
    with (
        pytest.raises(SpecError, match="not a single token"),
        sm.steer(Intervention(layer=1, sae=random_sae(64), edits=[Edit(0)], positions=["two words"])),
    ):
        pass
    with pytest.raises(SpecError, match="takes Intervention"), sm.steer({"layer": 1}):
        pass


def test_loaded_sae_serialises_through_where_it_was_loaded_from(tmp_path):
    from hub import load_sae, save_sae

    sae = random_sae(64)
    spec = Intervention(layer=1, sae=sae, edits=[Edit(0, "set", 2.0)])
    with pytest.raises(SpecError, match="has no reference to write"):
        spec.to_json()
    save_sae(sae, tmp_path / "my_sae")
    loaded = load_sae(tmp_path / "my_sae")
    assert loaded.source == str((tmp_path / "my_sae").resolve())
    named = Intervention.from_dict(_spec_dict(sae="elsewhere/unused"), sae=loaded)
    assert named.sae is loaded and json.loads(named.to_json())["sae"] == loaded.source
    swapped = Intervention.from_dict(_spec_dict()).with_sae(loaded)
    assert swapped.sae is loaded and swapped.to_dict()["sae"] == loaded.source
    reloaded = Intervention.from_json(named.to_json()).load_sae()
    assert torch.equal(reloaded.W_dec, sae.W_dec)


def test_parse_sae_ref_is_the_one_parser(tmp_path):
    from steer.spec import parse_sae_ref, sae_ref_name

    (tmp_path / "runs" / "fast").mkdir(parents=True)
    folder = str((tmp_path / "runs" / "fast").resolve())
    assert parse_sae_ref(tmp_path / "runs" / "fast") == folder
    assert parse_sae_ref(str(tmp_path / "runs"), "fast") == {
        "path": str((tmp_path / "runs").resolve()),
        "sae_id": "fast",
    }
    assert parse_sae_ref("owner/name") == {"repo": "owner/name"}
    assert parse_sae_ref("owner/name:layer_15/fast") == {"repo": "owner/name", "sae_id": "layer_15/fast"}
    assert parse_sae_ref("owner/name", "x") == {"repo": "owner/name", "sae_id": "x"}
    assert sae_ref_name({"repo": "owner/name", "sae_id": "x"}) == "owner/name:x"
    assert sae_ref_name(folder) == "fast"
    for bad, why in [("", "empty"), ("no_such_folder", "neither an existing folder"), ("a/b/c", "neither")]:
        with pytest.raises(SpecError, match=why):
            parse_sae_ref(bad)
    with pytest.raises(SpecError, match="but sae_id 'y' was also given"):
        parse_sae_ref("owner/name:x", "y")


def test_spec_layer_must_match_the_sae_layer_unless_allowed():
    sae = random_sae(64)
    sae.cfg.metadata["hook_name"] = "blocks.2.hook_resid_post"
    sm = SteeredModel(build_tiny_model("llama", 100, n_layers=4), None)
    with (
        pytest.raises(SpecError, match=r"edits layer 1, but its SAE was trained on layer 2 \(blocks.2"),
        sm.steer(Intervention(layer=1, sae=sae, edits=[Edit(0)], positions="all")),
    ):
        pass
    assert sm.compile(
        Intervention(layer=1, sae=sae, edits=[Edit(0)], positions="all", allow_layer_mismatch=True)
    )
    assert sm.compile(Intervention(layer=2, sae=sae, edits=[Edit(0)], positions="all"))
    data = {"layer": 1, "sae": "unused", "edits": [{"feature": 0}], "positions": "all"}
    with pytest.raises(SpecError, match="trained on layer 2"):
        sm.compile(Intervention.from_dict(data, sae=sae))
    allowed = Intervention.from_dict({**data, "allow_layer_mismatch": True}, sae=sae)
    assert sm.compile(allowed) and allowed.allow_layer_mismatch
    with pytest.raises(SpecError, match="allow_layer_mismatch must be true or false"):
        Intervention.from_dict({**data, "allow_layer_mismatch": "yes"})


def test_spec_files_and_sae_loading_through_hub(tmp_path):
    from hub import save_sae

    sae = random_sae(64, d_sae=48, architecture="jumprelu")
    save_sae(sae, tmp_path / "saes" / "l1")
    specs = [
        Intervention(layer=1, sae="saes/l1", edits=[Edit(3, "add", 2.0)]),
        Intervention(layer=1, sae="saes/l1", edits=[Edit(4, "scale", 0.5)], positions="all"),
    ]
    (tmp_path / "two.json").write_text(dump_interventions(specs))
    (tmp_path / "one.yaml").write_text(specs[0].to_yaml())
    loaded = load_interventions(tmp_path / "two.json")
    assert [s.edits for s in loaded] == [s.edits for s in specs]
    assert loaded[0].sae == str(tmp_path / "saes" / "l1"), (
        "relative SAE folders resolve against the spec file"
    )
    one = Intervention.from_file(tmp_path / "one.yaml")
    restored = one.load_sae()
    assert restored.architecture == "jumprelu" and restored.d_sae == 48
    assert (restored.W_dec == sae.W_dec).all()
    with pytest.raises(SpecError, match="holds 2 interventions"):
        Intervention.from_file(tmp_path / "two.json")
    # A `metadata` mapping beside the interventions (notes such as a strength scale) is carried, not read.
    (tmp_path / "noted.json").write_text(dump_interventions(specs, {"strength_scale": {"norm": 194.3}}))
    assert json.loads((tmp_path / "noted.json").read_text())["metadata"] == {
        "strength_scale": {"norm": 194.3}
    }
    assert [s.edits for s in load_interventions(tmp_path / "noted.json")] == [s.edits for s in specs]
    (tmp_path / "bad.json").write_text(json.dumps({"interventions": [specs[0].to_dict()], "metadata": 3}))
    with pytest.raises(SpecError, match="metadata must be a mapping"):
        load_interventions(tmp_path / "bad.json")
    with pytest.raises(SpecError, match="must end in .json, .yaml or .yml"):
        (tmp_path / "spec.txt").write_text("{}")
        load_interventions(tmp_path / "spec.txt")
    with pytest.raises(SpecError, match="could not load SAE"):
        Intervention(layer=1, sae=str(tmp_path / "nowhere"), edits=[]).load_sae()
    too_big = Intervention(layer=1, sae=str(tmp_path / "saes" / "l1"), edits=[Edit(48)])
    with pytest.raises(SpecError, match="out of range for an SAE with d_sae=48"):
        too_big.load_sae()


def test_sae_ref_key_compares_references_by_what_they_name(tmp_path):
    from steer.spec import sae_ref_key

    (tmp_path / "sweep" / "topk").mkdir(parents=True)
    folder = str(tmp_path / "sweep" / "topk")
    assert sae_ref_key(folder) == sae_ref_key({"path": str(tmp_path / "sweep"), "sae_id": "topk"})
    assert sae_ref_key({"path": str(tmp_path / "sweep"), "sae_id": "topk"}) != sae_ref_key(
        str(tmp_path / "sweep")
    )
    hub = {"repo": "owner/name", "sae_id": "a"}
    assert sae_ref_key(hub) != sae_ref_key({"repo": "owner/name", "sae_id": "b"})
    assert sae_ref_key(hub) != sae_ref_key({**hub, "revision": "v2"}) and sae_ref_key(None) == ""

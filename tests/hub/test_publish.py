"""Publishing: the staged upload tree, sub-folder naming, the model card, pulling, failing fast offline."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from hub import HubUnavailableError, load_sae, save_sae
from hub.card import CardEntry, render_card
from hub.publish import pull_sae, push_saes, sae_subfolder
from hub.remote import resolve_token, scrub
from tests.hub.sae_factory import random_sae, write_fast_release_sae, write_sparsify_sae


@pytest.fixture
def sources(tmp_path):
    """A FAST release (SAELens 5) folder, one of ours with results files beside it, a sparsify folder."""
    release, _ = write_fast_release_sae(tmp_path / "release", method="BT(P)", layer=2, arch="jumprelu")
    ours = save_sae(random_sae("topk", layer=5, method="FAST", training_tokens=2_000_000), tmp_path / "mine")
    (ours / "eval.json").write_text(
        json.dumps({"l0": 6.0, "fvu": 0.125, "ce_loss": {"clean": 2.5, "spliced": 2.75}})
    )
    (ours / "notes.bin").write_bytes(b"\x00" * 8)  # not an SAE file: must not be uploaded
    sparse, _ = write_sparsify_sae(tmp_path / "sparsify", layer=3)
    return [release, ours, sparse]


def _tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_dry_run_writes_the_upload_tree(tmp_path, sources):
    result = push_saes(sources, "me/tiny-saes", dry_run_dir=tmp_path / "tree")
    assert result.tree == tmp_path / "tree" and result.url is None
    assert sorted(result.sae_ids) == [
        "BT(P)/blocks_2_hook_resid_post_8X_2048_jumprelu",
        "FAST/blocks_5_hook_resid_post_4X_256_topk",
        "blocks_3_hook_resid_post_4X_1024_topk",
    ]
    assert _tree(tmp_path / "tree") == sorted(
        ["README.md"]
        + [
            f"{sae_id}/{name}"
            for sae_id in result.sae_ids
            for name in ("cfg.json", "sae_weights.safetensors")
        ]
        + ["FAST/blocks_5_hook_resid_post_4X_256_topk/eval.json"]
    )
    x = torch.randn(3, 16)
    for sae_id, source in zip(sorted(result.sae_ids), sources, strict=True):
        uploaded = load_sae(tmp_path / "tree", sae_id, dtype="float32")
        original = load_sae(source, dtype="float32")
        assert torch.allclose(uploaded.encode(x), original.encode(x), atol=1e-5)
    sparsify_cfg = json.loads(
        (tmp_path / "tree" / "blocks_3_hook_resid_post_4X_1024_topk" / "cfg.json").read_text()
    )
    assert sparsify_cfg["dtype"] == "bfloat16" and sparsify_cfg["metadata"]["converted_from"] == "sparsify"


def test_model_card(tmp_path, sources):
    push_saes(sources, "me/tiny-saes", dry_run_dir=tmp_path / "tree")
    card = (tmp_path / "tree" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    matter = yaml.safe_load(front)
    assert matter["library_name"] == "saelens"
    assert {"sparse-autoencoder", "saelens", "fast-steer", "jumprelu", "topk", "FAST", "BT(P)"} <= set(
        matter["tags"]
    )
    assert set(matter["base_model"]) == {"Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert (
        "| BT(P)/blocks_2_hook_resid_post_8X_2048_jumprelu | jumprelu | 2 | blocks.2.hook_resid_post | 16 | 128 | 8x |"
        in body
    )
    assert "| metadata.training_tokens | 2000000 |" in body
    assert "Evaluation results (`eval.json`)" in body
    assert "| ce_loss.spliced | 2.75 |" in body and "| fvu | 0.125 |" in body
    assert 'SAE.from_pretrained("me/tiny-saes", "BT(P)/blocks_2_hook_resid_post_8X_2048_jumprelu")' in body
    assert 'SAE.load_from_disk(f"{root}/BT(P)/blocks_2_hook_resid_post_8X_2048_jumprelu")' in body
    assert 'load_sae("me/tiny-saes", "BT(P)/blocks_2_hook_resid_post_8X_2048_jumprelu")' in body
    assert "fast-steer pull me/tiny-saes" in body


def test_card_escapes_table_cells():
    entry = CardEntry(
        "a", {"architecture": "standard", "d_in": 2, "d_sae": 4, "metadata": {"note": "x|y\nz"}}
    )
    assert "| metadata.note | x\\|y z |" in render_card("me/r", [entry])
    with pytest.raises(ValueError, match="at least one SAE"):
        render_card("me/r", [])


def test_subfolder_names(tmp_path):
    assert sae_subfolder(random_sae("jumprelu", method="BT(F)"), tmp_path / "x") == (
        "BT(F)/blocks_2_hook_resid_post_4X_256_jumprelu"
    )
    odd = random_sae("standard", d_sae=40)
    assert sae_subfolder(odd, tmp_path) == "blocks_2_hook_resid_post_40_256_standard"
    unknown = random_sae("standard")
    unknown.cfg.metadata.pop("hook_name")
    unknown.cfg.metadata.pop("hook_layer")
    assert sae_subfolder(unknown, tmp_path / "my sae") == "my_sae"


def test_duplicate_destinations_are_refused(tmp_path):
    a = save_sae(random_sae("standard", seed=1), tmp_path / "a")
    b = save_sae(random_sae("standard", seed=2), tmp_path / "b")
    with pytest.raises(
        ValueError, match="would both be uploaded as 'blocks_2_hook_resid_post_4X_256_standard'"
    ):
        push_saes([a, b], "me/r", dry_run_dir=tmp_path / "tree")


def test_dry_run_needs_an_empty_folder(tmp_path, sources):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        push_saes(sources, "me/r", dry_run_dir=tmp_path / "tree")
    with pytest.raises(ValueError, match="must look like owner/name"):
        push_saes(sources, "no-owner", dry_run_dir=tmp_path / "t2")


def test_real_push_fails_fast_when_the_hub_is_unreachable(tmp_path, sources, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    with pytest.raises(
        HubUnavailableError, match="cannot push to me/r: the Hugging Face Hub is unreachable"
    ) as info:
        push_saes(sources, "me/r")
    assert "hf_secret_token_value" not in str(info.value)


def test_token_resolution_and_scrubbing(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert resolve_token("hf_explicit") == "hf_explicit"
    assert resolve_token() == "hf_from_env"
    assert scrub("401 for hf_from_env at url", "hf_from_env") == "401 for *** at url"


def test_pull_validates_and_converts(tmp_path):
    folder, _ = write_fast_release_sae(tmp_path / "release")
    sae, source, written = pull_sae(
        str(tmp_path / "release"), folder.relative_to(tmp_path / "release").as_posix(), out=tmp_path / "v6"
    )
    assert source == folder and written == tmp_path / "v6"
    cfg = json.loads((written / "cfg.json").read_text())
    assert cfg["metadata"]["sae_lens_training_version"] == "5.3.3" and cfg["architecture"] == "jumprelu"
    assert torch.equal(load_sae(written).W_enc, sae.W_enc)

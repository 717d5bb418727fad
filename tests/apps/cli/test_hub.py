"""`fast-steer push` / `fast-steer pull` through the real click CLI."""

from __future__ import annotations

import json

from click.testing import CliRunner

from apps.cli import main
from hub import load_sae, save_sae
from tests.hub.sae_factory import random_sae, write_fast_release_sae

SECRET = "hf_cliSecretToken0123456789"


def test_push_dry_run(tmp_path):
    release, _ = write_fast_release_sae(tmp_path / "release", method="FAST", layer=2)
    mine = save_sae(random_sae("topk", layer=4, method="BT(F)"), tmp_path / "mine")
    (mine / "eval.json").write_text(json.dumps({"l0": 6.0}))
    tree = tmp_path / "tree"
    result = CliRunner().invoke(
        main,
        ["push", str(release), str(mine), "--repo", "me/saes", "--dry-run", str(tree)],
        env={"HF_TOKEN": SECRET},
    )
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert f"dry run: nothing uploaded; the tree for me/saes is in {tree}" in result.output
    files = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    assert files == [
        "BT(F)/blocks_4_hook_resid_post_4X_256_topk/cfg.json",
        "BT(F)/blocks_4_hook_resid_post_4X_256_topk/eval.json",
        "BT(F)/blocks_4_hook_resid_post_4X_256_topk/sae_weights.safetensors",
        "FAST/blocks_2_hook_resid_post_8X_2048_jumprelu/cfg.json",
        "FAST/blocks_2_hook_resid_post_8X_2048_jumprelu/sae_weights.safetensors",
        "README.md",
    ]
    for name in files:
        assert f"  {name}  (" in result.output
    card = (tree / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n") and SECRET not in card
    assert "| l0 | 6 |" in card
    assert load_sae(tree, "FAST/blocks_2_hook_resid_post_8X_2048_jumprelu").architecture == "jumprelu"


def test_push_without_dry_run_fails_fast_offline(tmp_path):
    mine = save_sae(random_sae("standard"), tmp_path / "mine")
    result = CliRunner().invoke(
        main, ["push", str(mine), "--repo", "me/saes"], env={"HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "1"}
    )
    assert result.exit_code == 1
    assert "Error: cannot push to me/saes: the Hugging Face Hub is unreachable" in result.output
    assert SECRET not in result.output


def test_push_reports_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        main, ["push", str(tmp_path / "empty"), "--repo", "me/saes", "--dry-run", str(tmp_path / "t")]
    )
    assert (
        result.exit_code == 1
        and "missing file cfg.json" in result.output
        and "Traceback" not in result.output
    )


def test_pull_local_release_and_convert(tmp_path):
    write_fast_release_sae(tmp_path / "release", method="BT(P)", layer=2, arch="standard")
    sae_id = "BT(P)/blocks_2_hook_resid_post_8X_2048_standard"
    out = tmp_path / "converted"
    result = CliRunner().invoke(
        main, ["pull", str(tmp_path / "release"), "--sae-id", sae_id, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "architecture: standard" in result.output and "layer: 2" in result.output
    assert "method: BT(P)" in result.output and "converted_from: saelens-v5" in result.output
    assert f"saved (SAELens v6 layout) to {out}" in result.output
    assert json.loads((out / "cfg.json").read_text())["metadata"]["method"] == "BT(P)"


def test_pull_lists_sae_ids_and_fails_fast_offline(tmp_path):
    write_fast_release_sae(tmp_path / "release", method="FAST", layer=1)
    result = CliRunner().invoke(main, ["pull", str(tmp_path / "release")])
    assert (
        result.exit_code == 1
        and "choose sae_id from: FAST/blocks_1_hook_resid_post_8X_2048_jumprelu" in result.output
    )
    offline = CliRunner().invoke(
        main, ["pull", "Geaming/Nowhere_SAEs", "--sae-id", "FAST/x"], env={"HF_HUB_OFFLINE": "1"}
    )
    assert offline.exit_code == 1
    assert (
        "cannot download FAST/x/cfg.json from Geaming/Nowhere_SAEs: the Hugging Face Hub is unreachable"
        in offline.output
    )


def test_pull_resolve_only_needs_no_network():
    args = ["pull", "--resolve-only", "gemma-scope-2-1b-it-res", "layer_13_width_16k_l0_medium"]
    result = CliRunner().invoke(main, args, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    for line in (
        "repo_id: google/gemma-scope-2-1b-it",
        "path: resid_post/layer_13_width_16k_l0_medium",
        "format: gemma-scope-2",
        "neuronpedia: gemma-3-1b-it/13-gemmascope-2-res-16k",
    ):
        assert line in result.output
    bad = CliRunner().invoke(main, ["pull", "--resolve-only", "llama_scope_lxr_8x", "l15r_9x"])
    assert bad.exit_code == 1 and "closest ids: l15r_8x" in bad.output

"""SAELens 6 (in its own venv, `make saelens-venv`) loads what we write and gets our feature activations;
we load what SAELens writes and get its activations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hub import load_sae, sae_layer, save_sae
from hub.publish import push_saes
from tests.hub.sae_factory import (
    fake_hub_cache,
    random_sae,
    run_saelens_worker,
    write_fast_release_sae,
    write_sparsify_sae,
)

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("saelens_worker.py")
HUB_REPO = "me/tiny-saes"

OURS = {
    "standard": dict(arch="standard"),
    "jumprelu_layer_norm": dict(arch="jumprelu", normalize="layer_norm"),
    "topk_constant_norm_rescale": dict(arch="topk", normalize="constant_norm_rescale"),
    "standard_expected_average": dict(arch="standard", normalize="expected_average_only_in"),
    "jumprelu_bfloat16": dict(arch="jumprelu", dtype="bfloat16"),
    "topk_bfloat16": dict(arch="topk", dtype="bfloat16"),
}
CONVERTED = ("from_fast_release", "from_sparsify")


@pytest.fixture(scope="module")
def exchange(tmp_path_factory):
    """Our folders and inputs in a work dir, the SAELens worker run once over them; its outputs."""
    work = tmp_path_factory.mktemp("saelens")
    torch.manual_seed(0)
    x = torch.randn(8, 16) * 3 + 0.5
    save_file({"x": x}, str(work / "inputs.safetensors"))
    saes = {}
    for seed, (name, spec) in enumerate(OURS.items()):
        spec = dict(spec)
        saes[name] = random_sae(spec.pop("arch"), seed=seed, **spec)
        save_sae(saes[name], work / "ours" / name)
    release, _ = write_fast_release_sae(work / "release")
    sparse, _ = write_sparsify_sae(work / "sparsify", layer=2)
    for name, source in zip(CONVERTED, (release, sparse), strict=True):
        saes[name] = load_sae(source, dtype="float32")
        save_sae(saes[name], work / "ours" / name)
    # the pushed tree, placed in a Hugging Face cache, is what `SAE.from_pretrained(repo, sae_id)` reads
    pushed = push_saes([work / "ours" / "jumprelu_layer_norm", release], HUB_REPO, dry_run_dir=work / "tree")
    fake_hub_cache(
        work / "hf-cache",
        HUB_REPO,
        {
            p.relative_to(work / "tree").as_posix(): p.read_bytes()
            for p in (work / "tree").rglob("*")
            if p.is_file()
        },
    )
    (work / "hub.json").write_text(json.dumps({"repo": HUB_REPO, "sae_ids": pushed.sae_ids}))
    run_saelens_worker(WORKER, work)
    return work, x, saes, load_file(str(work / "saelens_out.safetensors")), pushed.sae_ids


@pytest.mark.parametrize("name", [*OURS, *CONVERTED])
def test_saelens_loads_our_folders(exchange, name):
    _, x, saes, theirs, _ = exchange
    sae = saes[name]
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
    loose = sae.dtype == torch.bfloat16
    atol = 2e-2 if loose else 1e-5
    assert torch.allclose(theirs[f"{name}.acts"], acts.float(), atol=atol, rtol=1e-2 if loose else 1e-5)
    assert torch.equal(theirs[f"{name}.acts"] != 0, acts != 0) or loose
    assert torch.allclose(theirs[f"{name}.recon"], recon.float(), atol=5e-2 if loose else 1e-3)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_we_load_saelens_folders(exchange, arch):
    work, x, _, theirs, _ = exchange
    sae = load_sae(work / "theirs" / arch)
    assert sae.architecture == arch and sae.d_in == 16 and sae.d_sae == 64
    assert sae_layer(sae) == 2 and sae.metadata["model_name"] == "tiny-llama"
    with torch.no_grad():
        acts = sae.encode(x)
    assert torch.allclose(acts, theirs[f"theirs.{arch}.acts"], atol=1e-5)
    assert int((acts != 0).sum()) > 0


def test_saelens_loads_our_pushed_repo_as_the_card_says(exchange):
    work, x, _, theirs, sae_ids = exchange
    assert len(sae_ids) == 2
    for i, sae_id in enumerate(sae_ids):
        assert 'SAE.from_pretrained("me/tiny-saes", ' in (work / "tree" / "README.md").read_text()
        with torch.no_grad():
            ours = load_sae(work / "tree", sae_id).encode(x)
        assert torch.allclose(theirs[f"hub.{i}.acts"], ours, atol=1e-5)
        assert int((ours != 0).sum()) > 0


def test_saelens_is_not_a_project_dependency():
    assert importlib.util.find_spec("sae_lens") is None

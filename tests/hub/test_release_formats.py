"""Public SAE release formats read without unpickling (Gemma Scope 1 and 2, Llama Scope, Llama-Scope-R1), by
SAELens release id through fast-steer's registry, checked against SAELens 6.54.12 (`.venv-saelens`) on the
same synthetic files: same feature activations. Also: the registry against the pinned yaml, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hub import SAEFormatError, load_sae
from hub.registry import lookup, neuronpedia_url, releases, saelens_version
from hub.sae_io import describe_reference
from steer.sites import Site
from steer.spec import Intervention, SpecError, parse_sae_ref
from tests.hub import release_factory as rf
from tests.hub.sae_factory import fake_hub_cache, run_saelens_worker

REPO = Path(__file__).resolve().parents[2]
SAELENS_YAML = next(
    (REPO / ".venv-saelens" / "lib").glob("python*/site-packages/sae_lens/pretrained_saes.yaml"), None
)
WORKER = Path(__file__).with_name("saelens_release_worker.py")


def _first(release: str, contains: str) -> str:
    return next(s["id"] for s in releases()[release]["saes"] if contains in lookup(release, s["id"]).path)


# name -> (release, sae_id, writer(root, path) -> files, SAELens cfg_overrides)
def _cases() -> dict[str, tuple]:
    gs1 = "gemma-scope-2b-pt-res"
    gs2 = "gemma-scope-2-1b-it-res"
    llama_nsf = lookup("llama_scope_lxr_8x", "l15r_8x").norm_scaling_factor
    return {
        "gs1": (
            gs1,
            _first(gs1, "layer_3/width_16k"),
            lambda root, p: rf.gemma_scope_1(root, p, d_sae=16384),
            {"d_in": rf.D_IN},
        ),
        "gs1_lower": (
            gs1,
            _first(gs1, "layer_5/width_16k"),
            lambda root, p: rf.gemma_scope_1(root, p, d_sae=16384, lower=True, seed=5),
            {"d_in": rf.D_IN},
        ),
        "gs1_embedding": (
            gs1,
            _first(gs1, "embedding/width_4k"),
            lambda root, p: rf.gemma_scope_1(root, p, d_sae=4096, seed=7),
            {"d_in": rf.D_IN},
        ),
        "gs1_transcoder": (
            "gemma-scope-2b-pt-transcoders",
            "layer_0/width_16k/average_l0_76",
            lambda root, p: rf.gemma_scope_1(root, p, d_sae=16384, seed=23),
            {"d_in": rf.D_IN, "d_out": rf.D_IN},
        ),
        "gs2_res": (
            gs2,
            "layer_13_width_16k_l0_medium",
            lambda root, p: rf.gemma_scope_2(root, p, config=rf.gs2_config(13, "resid_post")),
            {},
        ),
        "gs2_res_no_config": (
            gs2,
            "layer_7_width_16k_l0_small",
            lambda root, p: rf.gemma_scope_2(root, p, seed=3),
            {},
        ),
        "gs2_attn": (
            "gemma-scope-2-1b-it-att",
            "layer_13_width_16k_l0_medium",
            lambda root, p: rf.gemma_scope_2(root, p, config=rf.gs2_config(13, "attn_out"), seed=11),
            {},
        ),
        "gs2_mlp": (
            "gemma-scope-2-1b-it-mlp",
            "layer_13_width_16k_l0_medium",
            lambda root, p: rf.gemma_scope_2(root, p, config=rf.gs2_config(13, "mlp_out"), seed=13),
            {},
        ),
        "gs2_transcoder": (
            "gemma-scope-2-1b-it-transcoders",
            "transcoder/layer_13_width_16k_l0_big",
            lambda root, p: rf.gemma_scope_2_transcoder(
                root, p, affine=False, config=rf.gs2_config(13, "transcoder"), seed=15
            ),
            {},
        ),
        "gs2_transcoder_affine": (
            "gemma-scope-2-1b-it-transcoders",
            "transcoder/layer_13_width_16k_l0_big_affine",
            lambda root, p: rf.gemma_scope_2_transcoder(
                root, p, affine=True, config=rf.gs2_config(13, "transcoder", affine=True), seed=17
            ),
            {},
        ),
        "gs2_transcoder_all_no_config": (
            "gemma-scope-2-1b-it-transcoders-all",
            "layer_0_width_16k_l0_big_affine",
            lambda root, p: rf.gemma_scope_2_transcoder(root, p, affine=True, seed=19),
            {},
        ),
        "mwhanna": (
            "mwhanna-qwen3-4b-transcoders",
            "layer_3",
            lambda root, p: rf.mwhanna_transcoder(root, 3, seed=21),
            {},
        ),
        "llama_scope": (
            "llama_scope_lxr_8x",
            "l15r_8x",
            lambda root, p: rf.llama_scope(root, p, 15, norm_scaling_factor=llama_nsf),
            {},
        ),
        "llama_scope_r1": (
            "llama_scope_r1_distill",
            "l15r_800m_slimpajama",
            lambda root, p: rf.llama_scope_r1(root, p, 15),
            {},
        ),
    }


@pytest.fixture(scope="module")
def releases_cache(tmp_path_factory):
    """Every case's files in one fake Hugging Face cache, the SAELens worker run once over them."""
    work = tmp_path_factory.mktemp("releases")
    by_repo: dict[str, dict[str, bytes]] = {}
    cases = _cases()
    for name, (release, sae_id, write, _) in cases.items():
        entry = lookup(release, sae_id)
        by_repo.setdefault(entry.repo_id, {}).update(write(work / "files" / name, entry.path))
    for repo_id, files in by_repo.items():
        fake_hub_cache(work / "hf-cache", repo_id, files)
    x = torch.randn(12, rf.D_IN, generator=torch.Generator().manual_seed(1)) * 2
    save_file({"x": x}, str(work / "inputs.safetensors"))
    spec = [{"name": n, "release": r, "sae_id": i, "cfg_overrides": o} for n, (r, i, _, o) in cases.items()]
    (work / "cases.json").write_text(json.dumps(spec))
    run_saelens_worker(WORKER, work)
    return work, x, load_file(str(work / "saelens_release_out.safetensors"))


@pytest.fixture
def hub_cache(releases_cache, monkeypatch):
    work, _, _ = releases_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(work / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return work


@pytest.mark.parametrize("name", list(_cases()))
def test_release_matches_saelens(name, releases_cache, hub_cache):
    _, x, theirs = releases_cache
    release, sae_id, _, _ = _cases()[name]
    sae = load_sae(f"{release}:{sae_id}", dtype="float32")
    with torch.no_grad():
        ours = sae.encode(x)
    assert ours.shape == theirs[name].shape
    assert (ours > 0).float().mean() > 0.05, "the fixture must activate some features"
    assert (ours - theirs[name]).abs().max().item() <= 1e-5
    entry = lookup(release, sae_id)
    assert sae.source == {"release": release, "sae_id": sae_id}
    assert sae.metadata["hook_name"] == entry.hook and sae.metadata.get("neuronpedia_id") == entry.neuronpedia


def test_sites_and_hooks(hub_cache):
    attn = load_sae("gemma-scope-2-1b-it-att", "layer_13_width_16k_l0_medium")
    assert attn.metadata["hook_name"] == "blocks.13.attn.hook_z"
    assert (attn.metadata["hf_hook_name"], attn.metadata["hf_hook_side"]) == (
        "model.layers.13.self_attn.o_proj",
        "input",
    )
    mlp = load_sae("gemma-scope-2-1b-it-mlp:layer_13_width_16k_l0_medium")
    assert mlp.metadata["hf_hook_name"] == "model.layers.13.post_feedforward_layernorm"
    res = load_sae("gemma-scope-2-1b-it-res:layer_13_width_16k_l0_medium")
    assert res.layer == 13 and res.metadata["neuronpedia_id"] == "gemma-3-1b-it/13-gemmascope-2-res-16k"
    transcoder = load_sae("gemma-scope-2-1b-it-transcoders:transcoder/layer_13_width_16k_l0_big")
    assert transcoder.metadata["hf_hook_name_out"] == "model.layers.13.post_feedforward_layernorm"
    edits = [{"feature": 0, "op": "add", "strength": 1.0}]
    # each is steered at its own site of layer 13; another layer is refused (unless allowed)
    for sae, kind in ((res, "resid_post"), (attn, "attn_z"), (mlp, "mlp_out"), (transcoder, "transcoder")):
        assert Intervention(sae=sae, layer=13, edits=edits).check_model(26, rf.D_IN, sae) == Site(13, kind)
        with pytest.raises(SpecError, match="trained on layer 13"):
            Intervention(sae=sae, layer=12, edits=edits).check_model(26, rf.D_IN, sae)
    gs1_transcoder = load_sae("gemma-scope-2b-pt-transcoders:layer_0/width_16k/average_l0_76")
    assert gs1_transcoder.transcoder and gs1_transcoder.d_out == rf.D_IN
    assert gs1_transcoder.metadata["hook_name_out"] == "blocks.0.hook_mlp_out"
    spec = Intervention(sae=gs1_transcoder, layer=0, edits=edits)
    assert spec.check_model(26, rf.D_IN, gs1_transcoder) == Site(0, "transcoder")
    embedding = load_sae("gemma-scope-2b-pt-res", _first("gemma-scope-2b-pt-res", "embedding/width_4k"))
    with pytest.raises(SpecError, match="reads hook_embed, which fast-steer cannot place a steering hook on"):
        Intervention(sae=embedding, layer=0, edits=edits).check_model(26, rf.D_IN, embedding)


def test_transcoder_skip_connections(releases_cache, hub_cache):
    """Gemma Scope 2's `affine_skip_connection` A is applied as `x @ A` (W_skip = A^T, SAELens's orientation);
    mwhanna's W_skip as `x @ W_skip^T`; the reconstruction adds it, steering's delta never needs it."""
    _, x, _ = releases_cache
    affine = load_sae("gemma-scope-2-1b-it-transcoders:transcoder/layer_13_width_16k_l0_big_affine")
    assert affine.architecture == "jumprelu_skip_transcoder" and affine.transcoder
    folder = next((hub_cache / "hf-cache").glob("models--google--gemma-scope-2-1b-it/snapshots/*"))
    raw = load_file(str(folder / "transcoder/layer_13_width_16k_l0_big_affine/params.safetensors"))
    with torch.no_grad():
        expected = affine.encode(x) @ raw["w_dec"] + raw["b_dec"] + x @ raw["affine_skip_connection"]
        torch.testing.assert_close(affine(x), expected)
    plain = load_sae("gemma-scope-2-1b-it-transcoders:transcoder/layer_13_width_16k_l0_big")
    assert plain.architecture == "jumprelu_transcoder" and not hasattr(plain, "W_skip")


def test_mwhanna_layouts(tmp_path):
    """A folder holding one layer file with the repo's config files (also the `wanb-config.yaml` spelling and a
    skip connection); several layer files need the release id to say which."""
    rf.mwhanna_transcoder(tmp_path / "one", 5, skip=True, typo=True)
    sae = load_sae(tmp_path / "one")
    raw = load_file(str(tmp_path / "one/layer_5.safetensors"))
    assert sae.architecture == "skip_transcoder" and sae.metadata["hook_name"] == "blocks.5.mlp.hook_in"
    assert torch.equal(sae.W_enc, raw["W_enc"].T) and torch.equal(sae.W_skip, raw["W_skip"])
    assert sae.metadata["model_name"] == "Qwen/Qwen3-4B"
    x = torch.randn(4, rf.D_IN)
    with torch.no_grad():
        torch.testing.assert_close(
            sae(x),
            torch.relu(x @ raw["W_enc"].T + raw["b_enc"]) @ raw["W_dec"] + raw["b_dec"] + x @ raw["W_skip"].T,
        )
    rf.mwhanna_transcoder(tmp_path / "two", 5)
    rf.mwhanna_transcoder(tmp_path / "two", 6)
    with pytest.raises(SAEFormatError, match="holds 2 transcoder layer files"):
        load_sae(tmp_path / "two")
    (tmp_path / "one/wanb-config.yaml").write_text("d_model:\n  value: 8\nd_feature:\n  value: 32\n")
    with pytest.raises(
        SAEFormatError, match=r"layer_5\.safetensors: tensor W_enc has shape \[64, 8\], expected \[32, 8\]"
    ):
        load_sae(tmp_path / "one")


def test_raw_repo_id_of_a_registered_folder(hub_cache):
    """SAELens rule 2 (a Hub repo id + folder) reaches the same files; fast-steer reads the format from them."""
    sae = load_sae("google/gemma-scope-2-1b-it:resid_post/layer_13_width_16k_l0_medium")
    assert sae.source == {
        "repo": "google/gemma-scope-2-1b-it",
        "sae_id": "resid_post/layer_13_width_16k_l0_medium",
    }
    assert sae.metadata["neuronpedia_id"] == "gemma-3-1b-it/13-gemmascope-2-res-16k"


def test_gemma_scope_1_embedding_scaling(releases_cache):
    work, x, _ = releases_cache
    name = "gs1_embedding"
    path = lookup(*_cases()[name][:2]).path
    # a local folder (here: in the Hugging Face cache, whose path names the repo): all derived from its path
    folder = next(
        (work / "hf-cache" / "models--google--gemma-scope-2b-pt-res" / "snapshots").glob(f"*/{path}")
    )
    raw = np.load(folder / "params.npz", allow_pickle=False)
    sae = load_sae(folder, dtype="float32")
    assert sae.metadata["hook_name"] == "hook_embed"
    assert torch.allclose(sae.W_enc, torch.from_numpy(raw["W_enc"]) / rf.D_IN**0.5)
    assert torch.allclose(sae.W_dec, torch.from_numpy(raw["W_dec"]) * rf.D_IN**0.5)


# -- the registry -------------------------------------------------------------------------------
REAL = [
    ("gemma-scope-2-1b-it-res", "layer_13_width_16k_l0_medium"),
    ("gemma-scope-9b-it-res-canonical", "layer_20/width_16k/canonical"),
    ("llama_scope_lxr_8x", "l15r_8x"),
    ("llama_scope_r1_distill", "l15r_800m_slimpajama"),
    ("goodfire-llama-3.1-8b-instruct", "layer_19"),
    ("llama-3.1-8b-instruct-andyrdt", "resid_post_layer_3_trainer_1"),
    ("qwen-scope-3.5-27b-w80k-l50", "layer5"),
    ("gemma-2b-it-res-jb", "blocks.12.hook_resid_post"),
    ("gemma-scope-2-4b-it-transcoders", "transcoder/layer_17_width_16k_l0_big_affine"),
    ("mwhanna-qwen3-4b-transcoders", "layer_3"),
    ("gemma-scope-2b-pt-transcoders", "layer_0/width_16k/average_l0_76"),
]


def test_registry_matches_the_pinned_yaml():
    assert SAELENS_YAML is not None, "the pinned SAELens is missing: run `make saelens-venv`"
    data = yaml.safe_load(SAELENS_YAML.read_text())
    assert saelens_version() == "6.54.12"
    for release, sae_id in REAL:
        entry = lookup(release, sae_id)
        theirs = data[release]
        sae = next(s for s in theirs["saes"] if s["id"] == sae_id)
        assert (entry.repo_id, entry.path) == (theirs["repo_id"], str(sae["path"]))
        assert entry.converter == (theirs.get("conversion_func") or "sae_lens")
        assert entry.neuronpedia == sae.get("neuronpedia")
        assert entry.norm_scaling_factor == sae.get("norm_scaling_factor")
    assert lookup(*REAL[1]).path == "layer_20/width_16k/average_l0_91"  # a SAELens-only alias, resolved
    assert lookup(*REAL[4]).needs_pickle and not lookup(*REAL[0]).needs_pickle
    assert (lookup(*REAL[6]).k, lookup(*REAL[6]).d_sae, lookup(*REAL[6]).d_in) == (50, 81920, 5120)
    assert (lookup(*REAL[8]).architecture, lookup(*REAL[8]).hook) == (
        "jumprelu_skip_transcoder",
        "blocks.17.hook_mlp_in",
    )
    assert (lookup(*REAL[9]).format, lookup(*REAL[9]).hook) == ("mwhanna-transcoder", "blocks.3.mlp.hook_in")
    assert (lookup(*REAL[10]).architecture, lookup(*REAL[10]).hook) == (
        "jumprelu_transcoder",
        "blocks.0.ln2.hook_normalized",
    )


def test_unknown_release_or_id_lists_the_closest():
    with pytest.raises(SAEFormatError, match="closest releases: gemma-scope-2-1b-it-res"):
        load_sae("gemma-scope-2-1b-it-rez:layer_13_width_16k_l0_medium")
    with pytest.raises(
        SAEFormatError,
        match="no sae_id 'layer_13_width_16k_l0_mediun'; closest ids: layer_13_width_16k_l0_medium",
    ):
        load_sae("gemma-scope-2-1b-it-res", "layer_13_width_16k_l0_mediun")
    with pytest.raises(SAEFormatError, match="give an sae_id"):
        load_sae("gemma-scope-2-1b-it-res")


def test_reference_syntax_and_resolve_only():
    assert parse_sae_ref("gemma-scope-2-1b-it-res:layer_7_width_16k_l0_small") == {
        "release": "gemma-scope-2-1b-it-res",
        "sae_id": "layer_7_width_16k_l0_small",
    }
    assert parse_sae_ref("owner/name:a/b") == {"repo": "owner/name", "sae_id": "a/b"}
    spec = Intervention.from_dict(
        {
            "sae": {"release": "llama_scope_lxr_8x", "sae_id": "l15r_8x"},
            "layer": 15,
            "edits": [{"feature": 1, "op": "add", "strength": 1}],
        }
    )
    assert spec.reference == {"release": "llama_scope_lxr_8x", "sae_id": "l15r_8x"}
    with pytest.raises(SpecError, match="needs its 'sae_id'"):
        Intervention.from_dict(
            {
                "sae": {"release": "llama_scope_lxr_8x"},
                "layer": 1,
                "edits": [{"feature": 1, "op": "add", "strength": 1}],
            }
        )
    where = describe_reference("goodfire-llama-3.1-8b-instruct:layer_19")
    assert where["repo_id"] == "Goodfire/Llama-3.1-8B-Instruct-SAE-l19" and where["needs_pickle"] is True
    assert where["neuronpedia"] == "llama3.1-8b-it/19-resid-post-gf"
    assert (
        neuronpedia_url(where["neuronpedia"], 7)
        == "https://www.neuronpedia.org/llama3.1-8b-it/19-resid-post-gf/7"
    )


# -- bad input ----------------------------------------------------------------------------------
def test_truncated_npz(tmp_path):
    rf.gemma_scope_1(tmp_path / "gemma-scope-2b-pt-res", "layer_3/width_4k/average_l0_50")
    path = tmp_path / "gemma-scope-2b-pt-res/layer_3/width_4k/average_l0_50/params.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SAEFormatError, match=r"params\.npz is not a readable \.npz file"):
        load_sae(path.parent)


def test_npz_width_disagrees_with_folder_name(tmp_path):
    rf.gemma_scope_1(tmp_path / "gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_50", d_sae=4096)
    with pytest.raises(
        SAEFormatError,
        match=r"params\.npz: W_enc has shape \[8, 4096\], but the folder name .* says width 16384",
    ):
        load_sae(tmp_path / "gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50")


def test_safetensors_missing_a_tensor(tmp_path):
    rf.gemma_scope_2(
        tmp_path,
        "resid_post/layer_7_width_16k_l0_small",
        config=rf.gs2_config(7, "resid_post"),
        drop="threshold",
    )
    with pytest.raises(SAEFormatError, match=r"params\.safetensors: missing tensor\(s\) threshold"):
        load_sae(tmp_path / "resid_post/layer_7_width_16k_l0_small")


def test_config_width_disagrees(tmp_path):
    rf.gemma_scope_2(
        tmp_path, "resid_post/layer_7_width_16k_l0_small", config=rf.gs2_config(7, "resid_post", width=128)
    )
    with pytest.raises(
        SAEFormatError, match=r"config\.json: width=128 but params\.safetensors has w_enc of shape \[8, 64\]"
    ):
        load_sae(tmp_path / "resid_post/layer_7_width_16k_l0_small")


def test_llama_scope_r1_needs_the_norm_scale(tmp_path):
    rf.llama_scope_r1(tmp_path, "L15R", 15)
    with pytest.raises(SAEFormatError, match="needs its input norm scale"):
        load_sae(tmp_path / "L15R")


def test_a_llama_scope_attn_out_sae_steers_the_attention_output(tmp_path):
    """Llama Scope's `hook_attn_out` (after o_proj) is the `attn_out` site: a spec on it steers."""
    from steer import Edit, SteeredModel
    from steer.hooks import decoder_layers
    from steer.sites import point_module
    from tests.chat_families import family_model, family_tokenizer

    rf.llama_scope(tmp_path, "L1A", 1, norm_scaling_factor=2.0, site="attn_out")
    sae = load_sae(tmp_path / "L1A", dtype="float32")
    assert sae.metadata["hook_name"] == "blocks.1.hook_attn_out"
    tok = family_tokenizer("llama3")
    sm = SteeredModel(family_model("llama3", n_layers=2, d_model=rf.D_IN), tok)
    spec = Intervention(sae=sae, layer=1, edits=[Edit(0, "add", 20.0)], positions="all")
    assert spec.check_model(2, rf.D_IN, sae) == Site(1, "attn_out")
    o_proj = decoder_layers(sm.model)[1].self_attn.o_proj
    assert point_module(decoder_layers(sm.model)[1], "attn_out") == (o_proj, "output")
    ids = torch.tensor([tok.encode("Hello there, how are you?")])
    with torch.no_grad():
        plain = sm(input_ids=ids).logits
        with sm.steer(spec) as report:
            steered = sm(input_ids=ids).logits
    assert report.positions == ids.shape[1]
    assert (steered - plain).abs().max() > 1e-3

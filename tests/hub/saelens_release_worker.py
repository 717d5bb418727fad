"""Runs inside `.venv-saelens` (SAELens 6.54.12, never imported by the project): loads synthetic fixtures of
public release formats with `SAE.from_pretrained(release, sae_id)` from a fake Hugging Face cache and stores
their feature activations.

    .venv-saelens/bin/python tests/hub/saelens_release_worker.py WORKDIR

`WORKDIR/cases.json`: [{"name", "release", "sae_id", "cfg_overrides"}]; `WORKDIR/inputs.safetensors["x"]`;
`HF_HUB_CACHE` points at the fake cache. Output: `WORKDIR/saelens_release_out.safetensors` (`<name>` = acts).
SAELens's `gemma_3` converter reads tensor shapes by an HTTP range request; here the same shapes are read
from the cached file's header (the only network call replaced). `cfg_overrides` shrink the widths SAELens
hard-codes from repo ids (Gemma Scope 1's d_in) to the fixture's.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main(work: Path) -> None:
    warnings.filterwarnings("ignore")
    from huggingface_hub import hf_hub_download
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    def local_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        with safe_open(hf_hub_download(repo_id, filename), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118

    loaders.get_safetensors_tensor_shapes = local_shapes
    x = load_file(str(work / "inputs.safetensors"))["x"]
    out = {}
    for case in json.loads((work / "cases.json").read_text()):
        conversion = get_pretrained_saes_directory()[case["release"]].conversion_func
        loader = loaders.NAMED_PRETRAINED_SAE_LOADERS[conversion]
        extra = case.get("cfg_overrides") or {}

        def converter(loader=loader, extra=extra, **kwargs):
            kwargs["cfg_overrides"] = {**(kwargs.get("cfg_overrides") or {}), **extra}
            return loader(**kwargs)

        sae = SAE.from_pretrained(case["release"], case["sae_id"], device="cpu", converter=converter)
        with torch.no_grad():
            out[case["name"]] = sae.encode(x[:, : sae.cfg.d_in].float()).contiguous()
    save_file(out, str(work / "saelens_release_out.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

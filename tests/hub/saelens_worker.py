"""Runs inside `.venv-saelens` (SAELens 6, never imported by the project): the other side of the
SAELens compatibility tests.

    .venv-saelens/bin/python tests/hub/saelens_worker.py WORKDIR

- every folder `WORKDIR/ours/<name>/` (written by fast-steer) is loaded with `SAE.load_from_disk`; its
  feature activations and reconstruction of `WORKDIR/inputs.safetensors["x"]` are stored as
  `<name>.acts` / `<name>.recon`;
- with `WORKDIR/hub.json` ({"repo": ..., "sae_ids": [...]}) and `HF_HUB_CACHE` pointing at a cache that
  holds our pushed tree, each SAE is loaded as the model card says, `SAE.from_pretrained(repo, sae_id)`,
  and its activations stored as `hub.<i>.acts`;
- SAELens writes one SAE per architecture to `WORKDIR/theirs/<arch>/` (random, non-trivial weights) and
  stores its own activations as `theirs.<arch>.acts`;
everything lands in `WORKDIR/saelens_out.safetensors`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _write_theirs(root: Path, x: torch.Tensor, results: dict[str, torch.Tensor]) -> None:
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    d_in, d_sae = x.shape[-1], 4 * x.shape[-1]
    metadata = {"model_name": "tiny-llama", "hook_name": "blocks.2.hook_resid_post", "context_size": 256}
    builds = {
        "standard": lambda: StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae)),
        "jumprelu": lambda: JumpReLUSAE(
            JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, normalize_activations="layer_norm")
        ),
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5)),
    }
    for arch, build in builds.items():
        torch.manual_seed(len(arch))
        sae = build()
        for key, value in metadata.items():
            sae.cfg.metadata[key] = value
        with torch.no_grad():
            for param in sae.parameters():
                param.copy_(torch.randn_like(param) * 0.3)
            if arch == "jumprelu":
                sae.threshold.abs_()
        sae.save_model(root / arch)
        with torch.no_grad():
            results[f"theirs.{arch}.acts"] = sae.encode(x).contiguous()


def main(workdir: Path) -> None:
    from sae_lens import SAE

    warnings.simplefilter("ignore")
    x = load_file(str(workdir / "inputs.safetensors"))["x"]
    results: dict[str, torch.Tensor] = {}
    for folder in sorted((workdir / "ours").iterdir()):
        sae = SAE.load_from_disk(folder)
        with torch.no_grad():
            acts = sae.encode(x.to(sae.dtype))
            results[f"{folder.name}.acts"] = acts.float().contiguous()
            results[f"{folder.name}.recon"] = sae.decode(acts).float().contiguous()
    if (workdir / "hub.json").exists():
        hub = json.loads((workdir / "hub.json").read_text())
        for i, sae_id in enumerate(hub["sae_ids"]):
            sae = SAE.from_pretrained(hub["repo"], sae_id)
            with torch.no_grad():
                results[f"hub.{i}.acts"] = sae.encode(x).float().contiguous()
    _write_theirs(workdir / "theirs", x, results)
    save_file(results, str(workdir / "saelens_out.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Turning command-line SAE references into the demo's SAEs, with their discovered features."""

from __future__ import annotations

from apps.demo.backend import DemoSAE, check_fits
from steer.errors import ConfigError
from steer.spec import SAERef, load_sae_reference, sae_ref_name
from train.feature_table import TopFeature, top_features
from train.features import discover_features


def load_demo_sae(ref: SAERef, model, name: str | None = None) -> DemoSAE:
    """Load the SAE at `ref` on the model's device and check that it fits the model."""
    sae = load_sae_reference(ref, device=model.device).eval()
    layer = sae.layer
    name = name or sae_ref_name(ref)
    if layer is None:
        raise ConfigError(
            f"SAE {name!r} does not say which layer it reads (no residual-stream hook_name in its cfg.json "
            "metadata); the demo needs an SAE on the residual stream after a decoder block"
        )
    check_fits(sae, layer, model, name)
    return DemoSAE(name=name, sae=sae)


def discover(
    model, tokenizer, demo_sae: DemoSAE, conversations, per_token: int = 5, progress: bool = True
) -> list[TopFeature]:
    """The top `per_token` features per special token of `demo_sae`, by discovery on `conversations`."""
    report = discover_features(
        model, tokenizer, demo_sae.sae, demo_sae.layer, conversations, top_k=per_token, progress=progress
    )
    return top_features(report, per_token)

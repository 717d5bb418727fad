"""A demo server on a tiny random Llama with a random SAE saved to a folder, for the API and browser tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from apps.demo import DemoBackend, DemoLimits, EditRow, build_app, launch_app
from apps.demo.loading import discover, load_demo_sae
from hub import save_sae
from steer.sae import SAEConfig, build_sae
from tests.conftest import build_tiny_model, free_port, read_conversations

# Gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix.
GRADIO_WARNINGS = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
LAYER = 2
D_SAE = 256


def tiny_backend(
    tokenizer,
    folder: Path,
    preselect: list[EditRow] | None = None,
    before_load: Callable[[Path], object] | None = None,
    limits: DemoLimits | None = None,
) -> DemoBackend:
    """A backend on a tiny Llama (d_model 64) with a random standard SAE (256 features) at layer 2;
    `before_load(folder)` runs between saving the SAE and loading it (to add labels, say)."""
    model = build_tiny_model("llama", len(tokenizer))
    torch.manual_seed(1)
    sae = build_sae(
        SAEConfig("standard", d_in=64, d_sae=D_SAE, metadata={"hook_name": f"blocks.{LAYER}.hook_resid_post"})
    )
    save_sae(sae, folder)
    if before_load is not None:
        before_load(folder)
    demo_sae = load_demo_sae(str(folder), model, name="tiny-sae")
    conversations = read_conversations(n=8)
    demo_sae.top_features = discover(model, tokenizer, demo_sae, conversations, per_token=3, progress=False)
    return DemoBackend(
        model,
        tokenizer,
        [demo_sae],
        model_ref="tiny-llama",
        limits=limits or DemoLimits(max_new_tokens=24, max_prompt_tokens=1024),
        sample_conversations=conversations,
        preselect=preselect,
    )


def serve(backend: DemoBackend) -> tuple[object, str]:
    """Launch the page on a free local port; returns (the Blocks, its URL)."""
    app = build_app(backend)
    launch_app(app, backend, port=free_port(), prevent_thread_lock=True, quiet=True)
    return app, app.local_url

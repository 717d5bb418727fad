"""A tiny Llama, an SAE folder for its layer 1, and `fast-steer serve` services on them for the server tests."""

from __future__ import annotations

import time

import httpx
import openai
import torch

from apps.serve.loading import load_named_saes
from apps.serve.schemas import Limits
from apps.serve.server import BackgroundServer, make_service
from hub import sae_metadata, save_sae
from tests.conftest import build_tiny_model
from tests.steer.helpers import random_sae

LAYER = 1
MODEL = "tiny"
STRONG = {"sae": "tiny", "layer": LAYER, "edits": [{"feature": 3, "op": "add", "strength": 40.0}]}
OTHER = {"sae": "tiny", "layer": LAYER, "edits": [{"feature": 5, "op": "add", "strength": -40.0}],
         "positions": "generated"}  # fmt: skip


def tiny_parts(tokenizer, root):
    """(model, tokenizer, SAE folder) on disk under `root`."""
    model = build_tiny_model("llama", len(tokenizer))
    sae = random_sae(model.config.hidden_size, 32, metadata=sae_metadata(MODEL, LAYER))
    save_sae(sae, root / "sae")
    return model, tokenizer, root / "sae"


def serving(model, tokenizer, sae_dir, **options) -> BackgroundServer:
    """`with serving(...) as server:` a background server for `tiny` (options: Limits fields, window,
    api_key, default_steering)."""
    limit_names = set(Limits.__dataclass_fields__)
    limits = Limits(**{k: options.pop(k) for k in list(options) if k in limit_names})
    saes = load_named_saes([f"tiny={sae_dir}"], model.device, model.config.hidden_size)
    service = make_service(model, tokenizer, saes, model_name=MODEL, limits=limits, **options)
    return BackgroundServer(service)


def client(server: BackgroundServer, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=api_key, max_retries=0, timeout=60)


def chat(cl: openai.OpenAI, text: str, **kwargs):
    """A chat completion of one user turn (greedy and 12 tokens unless told otherwise)."""
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 12)
    extra = {k: kwargs.pop(k) for k in ("steering", "compare") if k in kwargs}
    return cl.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], extra_body=extra or None, **kwargs
    )


def health(server: BackgroundServer) -> dict:
    return httpx.get(server.url.removesuffix("/v1") + "/health").json()


def hf_greedy(model, tokenizer, text: str, n: int) -> str:
    """The plain model's greedy reply to one user turn, straight from `generate` (special tokens dropped)."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def wait_for(predicate, what: str, seconds: float = 120.0) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `seconds` (a hang guard, not a speed bound)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)

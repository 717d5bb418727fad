"""`fast-steer serve` end to end on SmolLM2 (integration): plain replies are the model's own greedy replies,
a special-token `add` edit changes them, compare and streaming agree, and a mixed batch equals each alone
where the plain model is batch-invariant."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from apps.serve.loading import load_named_saes
from apps.serve.server import BackgroundServer, make_service
from hub import sae_metadata, save_sae
from steer import SteeredModel
from tests.steer.helpers import chat_ids, greedy, pad_batch, random_sae

pytestmark = pytest.mark.integration

LAYER = 15
PROMPTS = ["Tell me about yourself.", "What is the capital of France?"]
SPEC = {"sae": "rand", "layer": LAYER, "edits": [{"feature": 7, "op": "add", "strength": 300.0}]}


@pytest.fixture(scope="module")
def served(default_model, tmp_path_factory):
    model, tok = default_model
    sae = random_sae(model.config.hidden_size, 256, metadata=sae_metadata("SmolLM2-135M-Instruct", LAYER))
    folder = save_sae(sae, tmp_path_factory.mktemp("smollm2_serve") / "rand")
    saes = load_named_saes([str(folder)], model.device, model.config.hidden_size)
    with BackgroundServer(make_service(model, tok, saes, model_name="smol", window=0.3)) as server:
        yield model, tok, server


def _chat(server, text: str, **extra):
    import openai

    cl = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    stream = extra.pop("stream", False)
    return cl.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0,
        stream=stream, extra_body=extra or None,
    )  # fmt: skip


def test_plain_steered_compare_stream(served):
    model, tok, server = served
    plain = _chat(server, PROMPTS[0]).choices[0].message.content
    assert plain == SteeredModel(model, tok).chat(PROMPTS[0], max_new_tokens=16)
    steered = _chat(server, PROMPTS[0], steering=SPEC).choices[0].message.content
    assert steered != plain
    both = _chat(server, PROMPTS[0], steering=SPEC, compare=True).choices
    assert [(c.model_extra["label"], c.message.content) for c in both] == [
        ("steered", steered),
        ("plain", plain),
    ]
    chunks = _chat(server, PROMPTS[0], steering=SPEC, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == steered


def test_mixed_batch_equals_alone_where_batch_invariant(served):
    model, tok, server = served
    seqs = chat_ids(tok, PROMPTS)
    ids, mask = pad_batch(seqs, tok.pad_token_id, side="left")
    with torch.no_grad():
        batched = greedy(model.generate, ids, mask, 16, tok.pad_token_id)
        alone = [
            greedy(model.generate, *pad_batch([s], tok.pad_token_id), 16, tok.pad_token_id)[0] for s in seqs
        ]
    if not all(torch.equal(b, a) for b, a in zip(batched, alone, strict=True)):
        pytest.skip(
            "the plain model is not batch-invariant on these prompts here (left padding changes logits)"
        )
    requests = [(PROMPTS[0], SPEC), (PROMPTS[1], None)]
    with ThreadPoolExecutor(2) as pool:
        together = list(
            pool.map(lambda r: _chat(server, r[0], steering=r[1]).choices[0].message.content, requests)
        )
    assert together == [
        _chat(server, text, steering=spec).choices[0].message.content for text, spec in requests
    ]

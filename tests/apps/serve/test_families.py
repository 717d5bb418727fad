"""Mixed rows in the server for every chat-template family: one batch of requests under different specs (special
positions, none, generated positions), over real HTTP, equals each request sent alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from hub import sae_metadata, save_sae
from steer.chat_template import fold_system
from tests.apps.serve.helpers import LAYER, MODEL, OTHER, STRONG, chat, client, health, serving
from tests.chat_families import NAMES, family_model, family_tokenizer
from tests.steer.helpers import random_sae

PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hi"]


@pytest.mark.parametrize("name", NAMES)
def test_mixed_batch_equals_each_request_alone(name, tmp_path):
    # Gemma: a window longer than the prompts, since left padding counts against a sliding window
    model, tok = family_model(name, sliding_window=4096), family_tokenizer(name)
    save_sae(random_sae(model.config.hidden_size, 32, metadata=sae_metadata(MODEL, LAYER)), tmp_path / "sae")
    requests = [dict(text=PROMPTS[0], steering=STRONG), dict(text=PROMPTS[1], steering=None),
                dict(text=PROMPTS[2], steering=OTHER)]  # fmt: skip
    with serving(model, tok, tmp_path / "sae", window=0.3, max_batch=3) as server:
        cl = client(server)

        def ask(req: dict) -> str:
            req = dict(req)
            return chat(cl, req.pop("text"), max_tokens=6, **req).choices[0].message.content

        before = health(server)
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(ask, requests))
        assert health(server)["largest_batch"] == 3 and health(server)["batches"] - before["batches"] == 1
        alone = [ask(req) for req in requests]
        plain = ask(dict(text=PROMPTS[0], steering=None))
    assert together == alone
    assert together[0] != plain, "the special-position spec should act"


def test_gemma2_chat_with_a_system_message_is_folded(tmp_path):
    """Gemma 2's template raises on a system message: the server folds it into the first user turn, so the
    request is answered as the folded one is, and counts the folded prompt's tokens."""
    model, tok = family_model("gemma2", sliding_window=4096), family_tokenizer("gemma2")
    save_sae(random_sae(model.config.hidden_size, 32, metadata=sae_metadata(MODEL, LAYER)), tmp_path / "sae")
    system = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPTS[1]}]
    folded = fold_system(system)
    with serving(model, tok, tmp_path / "sae") as server:
        cl = client(server)
        replies = [
            cl.chat.completions.create(
                model=MODEL, messages=m, temperature=0, max_tokens=6, extra_body={"steering": STRONG}
            )
            for m in (system, folded)
        ]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    expected = tok.apply_chat_template(folded, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens == len(expected)

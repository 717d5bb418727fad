"""Placing forward calls from what the runtime has seen: decode steps, chunked prompts, recompute, beams,
hidden states, threads, and calls that cannot be placed."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from steer import Edit, Intervention, SpecError, SteeredModel
from tests.steer.helpers import (
    cache_kwargs,
    capture_edits,
    capture_layer,
    chat_ids,
    greedy,
    pad_batch,
    random_sae,
)

PROMPTS = ["What is the capital of France?", "Name three colours.", "Say hi"]
STRENGTH = 10.0


def _add_spec(sm, positions, strength=STRENGTH, seed=0):
    sae = random_sae(sm.d_model, 64, seed=seed)
    return Intervention(
        layer=sm.n_layers // 2, sae=sae, edits=[Edit(0, "add", strength)], positions=positions
    )


# -- checks shared by tiny models and SmolLM2 ---------------------------------------------------------
def check_decode_steps_edited(model, tok, n_new=5, positions="generated"):
    """Cached greedy generation by `model.generate` itself: "generated" edits every decode step's new
    position by exactly `strength` and never the prompt; "prompt" the reverse."""
    sm = SteeredModel(model, tok)
    spec = _add_spec(sm, positions)
    ids, mask = pad_batch(chat_ids(tok, PROMPTS[:2]), tok.pad_token_id)
    with torch.no_grad(), sm.steer(spec), capture_edits(model, spec.layer) as deltas:
        greedy(model.generate, ids, mask, n_new, tok.pad_token_id)
    assert len(deltas) == n_new, "one prefill and one forward per further token"
    norms = [d.norm(dim=-1) for d in deltas]
    real = mask.bool()
    prompt_edit = STRENGTH if positions == "prompt" else 0.0
    step_edit = STRENGTH if positions == "generated" else 0.0
    torch.testing.assert_close(
        norms[0][real], torch.full_like(norms[0][real], prompt_edit), rtol=1e-4, atol=1e-3
    )
    assert torch.equal(norms[0][~real], torch.zeros_like(norms[0][~real])), "padding is never edited"
    for step in norms[1:]:
        assert step.shape == (2, 1)
        torch.testing.assert_close(step, torch.full_like(step, step_edit), rtol=1e-4, atol=1e-3)


def check_chunked_prefill_equals_one_call(model, tok, split_at=None):
    """A prompt fed in two cached chunks gets the same marks and the same edited residuals as one call,
    by default split inside a role name (`ass` | `istant`), else at column `split_at`."""
    sm = SteeredModel(model, tok)
    spec = _add_spec(sm, "special")
    ids = torch.tensor([chat_ids(tok, PROMPTS[:1])[0]])
    inside_role = split_at is None
    if inside_role:  # right after the first token of the assistant role name
        names = dict(sm.special_tokens.roles)
        role = names["assistant"]
        assert len(role) >= 2, "the test needs a role name of several tokens"
        row = ids[0].tolist()
        split_at = next(i for i in range(len(row) - 1, 0, -1) if tuple(row[i : i + len(role)]) == role) + 1
    with torch.no_grad(), sm.steer(spec), capture_layer(model, spec.layer) as whole:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    cache = cache_kwargs(model, DynamicCache(config=model.config))
    with torch.no_grad(), sm.steer(spec), capture_layer(model, spec.layer) as chunks:
        model(input_ids=ids[:, :split_at], attention_mask=torch.ones_like(ids[:, :split_at]), **cache)
        model(input_ids=ids[:, split_at:], attention_mask=torch.ones_like(ids), **cache)
    joined = torch.cat(chunks, dim=1)
    torch.testing.assert_close(joined, whole[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad(), capture_layer(model, spec.layer) as plain:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    edited = (whole[0] - plain[0]).norm(dim=-1)[0] > 1.0
    assert edited.tolist() == sm.special_tokens.mask(ids[0]).tolist()
    if inside_role:
        assert edited[split_at - 1] and edited[split_at], "both halves of the split role name are marked"


def check_recompute_equals_cache(model, tok, positions, **gen):
    sm = SteeredModel(model, tok)
    spec = _add_spec(sm, positions, strength=40.0)
    ids, mask = pad_batch(chat_ids(tok, PROMPTS[:2]), tok.pad_token_id)
    with torch.no_grad():
        plain = greedy(model.generate, ids, mask, 6, tok.pad_token_id, **gen)
        with sm.steer(spec):
            cached = greedy(model.generate, ids, mask, 6, tok.pad_token_id, use_cache=True, **gen)
            recomputed = greedy(model.generate, ids, mask, 6, tok.pad_token_id, use_cache=False, **gen)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, plain), "the spec should change the greedy tokens"
    return cached


# -- tiny models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_decode_steps_are_edited_where_the_spec_says(tiny_model, positions):
    check_decode_steps_edited(*tiny_model, positions=positions)


def test_chunked_prefill_split_inside_a_role_name(tiny_model):
    check_chunked_prefill_equals_one_call(*tiny_model)


@pytest.mark.parametrize("positions", ["generated", "prompt", "special"])
def test_plain_model_generate_with_and_without_cache(tiny_model, positions):
    """`model.generate` itself (as lm-eval calls it), cached and recomputed, agree."""
    check_recompute_equals_cache(*tiny_model, positions)


@pytest.mark.parametrize("positions", ["special", "generated"])
def test_beam_search_follows_reordered_beams(tiny_model, positions):
    """Beam search reorders rows between steps: cached (the tracker follows `reorder_cache`) and
    recomputed (rows matched to the prefix they extend) must agree."""
    check_recompute_equals_cache(*tiny_model, positions, num_beams=3, num_return_sequences=2)


def test_reordered_cache_moves_each_rows_special_state(tiny_model):
    """A role name split over two steps, in a row that a beam reorder moves: the mark follows the row."""
    model, tok = tiny_model
    sm = SteeredModel(model, tok)
    spec = _add_spec(sm, "special")
    first, second = dict(sm.special_tokens.roles)["assistant"][:2]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    plain = tok.encode("Hello there friend", add_special_tokens=False)
    ids = torch.tensor([plain + [im_start, first], plain + plain[:2]])
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), sm.steer(spec), capture_edits(model, spec.layer) as deltas:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache))
        cache.reorder_cache(torch.tensor([1, 0]))
        step = torch.tensor([[second], [second]])
        model(input_ids=step, attention_mask=torch.ones(2, ids.shape[1] + 1), **cache_kwargs(model, cache))
    prefill, after = (d.norm(dim=-1) > 1.0 for d in deltas)
    assert prefill[0, -2:].tolist() == [True, True] and not prefill[1].any()
    assert after[:, 0].tolist() == [False, True], "the row that holds <|im_start|> ass is now row 1"


def check_hidden_states_show_the_edit(model, tok):
    """Hidden states asked for once before steering (transformers then installs its recorders), then
    inside `steer()`: they, and a user hook, show the edited residual."""
    sm = SteeredModel(model, tok)
    spec = _add_spec(sm, "all")
    ids, mask = pad_batch(chat_ids(tok, PROMPTS[:2]), tok.pad_token_id)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with sm.steer(spec):
            steered = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            with capture_layer(model, spec.layer) as user_hook:
                model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    norms = (steered[spec.layer + 1] - plain[spec.layer + 1]).norm(dim=-1)
    torch.testing.assert_close(norms[real], torch.full_like(norms[real], STRENGTH), rtol=1e-4, atol=1e-2)
    assert torch.equal(steered[spec.layer], plain[spec.layer]), "layers before the edit are untouched"
    torch.testing.assert_close(user_hook[0], steered[spec.layer + 1])


def check_threads_get_their_own_edits(model, tok, strength=40.0, n_new=8, rounds=3):
    """Three threads on one shared model, two steered by their own spec and one plain, interleaved."""
    sm = SteeredModel(model, tok)
    specs = {
        "a": _add_spec(sm, "all", strength, seed=1),
        "b": _add_spec(sm, "special", strength, seed=2),
        "plain": None,
    }
    ids, mask = pad_batch(chat_ids(tok, PROMPTS[:2]), tok.pad_token_id)

    def run(name: str) -> torch.Tensor:
        with torch.no_grad(), sm.steer(specs[name]):
            return greedy(model.generate, ids, mask, n_new, tok.pad_token_id)

    alone = {name: run(name) for name in specs}
    assert not torch.equal(alone["a"], alone["plain"]) and not torch.equal(alone["b"], alone["plain"])
    results: dict[str, list[torch.Tensor]] = {name: [] for name in specs}
    start = threading.Barrier(len(specs))
    failures: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                results[name].append(run(name))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    for name, outs in results.items():
        assert all(torch.equal(out, alone[name]) for out in outs), f"thread {name} saw another thread's edits"
    assert not sm.active


def test_hidden_states_show_the_edit_after_transformers_installed_its_recorders(tiny_model):
    check_hidden_states_show_the_edit(*tiny_model)


def test_two_threads_never_see_each_others_edits(tiny_model):
    check_threads_get_their_own_edits(*tiny_model)


def test_calls_that_cannot_be_placed_raise(tiny_model):
    model, tok = tiny_model
    sm = SteeredModel(model, tok)
    spec = _add_spec(sm, "generated")
    ids = torch.tensor([chat_ids(tok, PROMPTS[:1])[0]])
    cache = cache_kwargs(model, DynamicCache(config=model.config))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **cache)
        step = out.logits[:, -1:].argmax(-1)
        with (
            sm.steer(spec),
            pytest.raises(
                SpecError,
                match=r"starting at column \d+ \(cache .* has seen 0 rows x 0 columns; enter steer\(\) before",
            ),
        ):
            model(input_ids=step, attention_mask=torch.ones(1, ids.shape[1] + 1), **cache)
        with sm.steer(spec), pytest.raises(SpecError, match="signals disagree"):
            model(input_ids=step, attention_mask=torch.ones(1, ids.shape[1] + 5), **cache)


# -- SmolLM2 --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_decode_steps_and_split_role_name(default_model):
    model, tok = default_model
    check_decode_steps_edited(model, tok, n_new=4)
    check_chunked_prefill_equals_one_call(model, tok)


@pytest.mark.integration
def test_smollm2_hidden_states_and_threads(default_model):
    model, tok = default_model
    check_hidden_states_show_the_edit(model, tok)
    check_threads_get_their_own_edits(model, tok, strength=400.0, n_new=4, rounds=1)

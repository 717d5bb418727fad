"""The major chat-template families (Llama 3, Qwen2.5, Qwen3, Gemma 2, Gemma 3, Mistral, Phi-3, Phi-4-mini), each
with its own template, tokenizer and architecture: the tokens the `special` mode marks, the paper's Table 11 set,
Gemma's system message, and the steering guarantees (KV cache = recompute, special positions only, a prompt
split inside a role name, mixed rows, threads isolated)."""

from __future__ import annotations

import pytest
import torch
from jinja2 import TemplateError

from steer.chat_template import accepts_system, fold_system
from steer.positions import resolve_special_tokens
from tests.chat_families import FAMILIES, NAMES, family_model, family_tokenizer
from tests.conftest import read_conversations
from tests.steer.helpers import chat_ids
from tests.steer.test_placement import (
    check_chunked_prefill_equals_one_call,
    check_threads_get_their_own_edits,
)
from tests.steer.test_steered_model import (
    check_cache_equals_recompute,
    check_mixed_rows,
    check_special_only_touches_special,
)
from train.evaluate import paper_st_tokens
from train.sequences import fast_sequences

SYSTEM_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    """(family, tiny model, tokenizer) for each chat-template family."""
    return FAMILIES[request.param], family_model(request.param), family_tokenizer(request.param)


def _reference_marks(tok, ids: list[int], special: set[int], roles: list[tuple[int, ...]]) -> list[bool]:
    """Marks computed independently: the special tokens, and a whole role name right after one."""
    out = [False] * len(ids)
    for i, token in enumerate(ids):
        if token in special:
            out[i] = True
            for seq in roles:
                if tuple(ids[i + 1 : i + 1 + len(seq)]) == seq:
                    out[i + 1 : i + 1 + len(seq)] = [True] * len(seq)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_special_mode_marks_the_familys_tokens_and_role_names(name):
    family, tok = FAMILIES[name], family_tokenizer(name)
    st = resolve_special_tokens(tok)
    found = st.to_dict()
    assert set(found["special_tokens"]) == set(family.marked)
    spelled = {role: tok.convert_tokens_to_string(pieces) for role, pieces in found["role_tokens"].items()}
    assert spelled == family.roles
    assert all(len(seq) > 1 for _, seq in st.roles), "role names span several tokens (the harder case)"
    conv = read_conversations(n=1)[0]
    ids = list(
        tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    marks = st.mask(torch.tensor(ids)).tolist()
    assert marks == _reference_marks(tok, ids, set(st.special_ids), [seq for _, seq in st.roles])
    text = tok.encode(conv[0]["content"], add_special_tokens=False)
    assert not any(st.mask(torch.tensor(text)).tolist()), "message text is never marked"


@pytest.mark.parametrize("name", NAMES)
def test_paper_table_11_set(name):
    """Table 11: the special tokens inside a user/assistant chat (no begin-of-text, no closing eos, no
    system-only token) and the user and assistant role names (Gemma's `model`), never `system`."""
    family, tok = FAMILIES[name], family_tokenizer(name)
    paper = paper_st_tokens(resolve_special_tokens(tok), tok).to_dict()
    assert set(paper["special_tokens"]) == set(family.table11)
    spelled = {role: tok.convert_tokens_to_string(pieces) for role, pieces in paper["role_tokens"].items()}
    assert spelled == {role: n for role, n in family.roles.items() if role != "system"}


@pytest.mark.parametrize("name", NAMES)
def test_system_message_follows_the_template_and_training_folds_it_where_refused(name):
    """Gemma 2's template raises on a system message: training folds it into the first user turn exactly as
    Gemma 3's template does; the other templates render it themselves (Mistral v0.3 only into the last user
    turn: a finished conversation loses it, a prompt keeps it)."""
    family, tok = FAMILIES[name], family_tokenizer(name)
    assert accepts_system(tok) == (family.system != "raises")
    if family.system == "raises":
        with pytest.raises(TemplateError, match="System role not supported"):
            tok.apply_chat_template(SYSTEM_CHAT, tokenize=False)
        gemma3 = family_tokenizer("gemma3")
        assert tok.decode(fast_sequences([SYSTEM_CHAT], tok)[0]) == gemma3.apply_chat_template(
            SYSTEM_CHAT, tokenize=False
        )
    else:
        assert fast_sequences([SYSTEM_CHAT], tok)[0] == list(
            tok.apply_chat_template(SYSTEM_CHAT, tokenize=True, return_dict=True)["input_ids"]
        )
    text = tok.decode(fast_sequences([SYSTEM_CHAT], tok)[0])
    assert ("You are terse." in text) == (family.system != "last-user")
    if family.system != "raises":
        prompt = tok.apply_chat_template(SYSTEM_CHAT[:2], add_generation_prompt=True, tokenize=False)
        assert "You are terse." in prompt
    assert ("<|im_start|>system" in text or "system<|end_header_id|>" in text or "<|system|>" in text) == (
        family.system == "native"
    )


def test_fold_system_puts_it_before_the_first_user_turn():
    assert fold_system(SYSTEM_CHAT) == [
        {"role": "user", "content": "You are terse.\n\nName a colour."},
        SYSTEM_CHAT[2],
    ]
    assert fold_system(SYSTEM_CHAT[1:]) == SYSTEM_CHAT[1:]
    assert fold_system([SYSTEM_CHAT[0], SYSTEM_CHAT[2]]) == [
        {"role": "user", "content": "You are terse."},
        SYSTEM_CHAT[2],
    ]


# -- the steering guarantees, per family ---------------------------------------------------------------------
def test_kv_cache_equals_recompute(family):
    check_cache_equals_recompute(*family[1:], "special")


def test_special_positions_only(family):
    check_special_only_touches_special(*family[1:])


def test_prompt_split_inside_a_role_name(family):
    """Split inside the assistant's role name (`ass` | `ist` `ant`, Gemma's `m` | `o` `de` `l`); families
    whose roles are special tokens (Mistral, Phi) split right after the user turn's special token."""
    fam, model, tok = family
    split_at = None
    if not fam.roles:
        opening = tok.convert_tokens_to_ids("[INST]" if fam.name == "mistral" else "<|user|>")
        split_at = chat_ids(tok, ["What is the capital of France?"])[0].index(opening) + 1
    check_chunked_prefill_equals_one_call(model, tok, split_at)


def test_mixed_rows(family):
    fam, model, tok = family
    if fam.arch.startswith("gemma"):  # left padding counts against a sliding window: a row alone sees more
        model = family_model(fam.name, sliding_window=4096)
    check_mixed_rows(model, tok)


def test_threads_isolated(family):
    check_threads_get_their_own_edits(*family[1:], n_new=6, rounds=2)

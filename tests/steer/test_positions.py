"""Special-token resolution for ChatML and Llama-3-style templates, batch and streaming masks."""

from __future__ import annotations

import pytest
import torch

from steer.positions import OUTSIDE, MarkedSequence, SpecialTokens, resolve_special_tokens, token_ids
from tests.conftest import read_conversations

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """A tiny BPE tokenizer with Llama-3 header special tokens and a Llama-3-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for conv in read_conversations(n=100) for m in conv] + [
        "assistant user system"
    ] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|eot_id|>"
    )
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def _render(tokenizer, conv, generation_prompt=True) -> list[int]:
    out = tokenizer.apply_chat_template(
        conv, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def _expected_labels(tokenizer, ids, st) -> list[str | None]:
    """Reference labels computed independently: specials, plus the full role-name run after each special."""
    names = tokenizer.convert_ids_to_tokens(ids)
    sequences = [seq for _, seq in st.roles]
    out: list[str | None] = [None] * len(ids)
    for i, tok in enumerate(ids):
        if tok in st.special_ids:
            out[i] = names[i]
            for seq in sequences:
                if tuple(ids[i + 1 : i + 1 + len(seq)]) == seq:
                    for j in range(i + 1, i + 1 + len(seq)):
                        out[j] = names[j]
    return out


def test_chatml_resolves_specials_and_multi_token_roles(chatml_tokenizer):
    st = resolve_special_tokens(chatml_tokenizer)
    im_start, im_end = chatml_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert st.special_ids == tuple(sorted({im_start, im_end}))
    roles = dict(st.roles)
    assert set(roles) == {"system", "user", "assistant"}
    assert chatml_tokenizer.decode(list(roles["assistant"])) == "assistant"
    assert len(roles["assistant"]) > 1, "the tiny ChatML tokenizer splits 'assistant' like SmolLM2"
    assert st.role_of(roles["assistant"]) == "assistant"


def test_chatml_labels_on_a_real_conversation(chatml_tokenizer):
    st = resolve_special_tokens(chatml_tokenizer)
    conv = read_conversations(n=1)[0]
    ids = _render(chatml_tokenizer, conv)
    labels = st.labels(ids)
    assert labels == _expected_labels(chatml_tokenizer, ids, st)
    # the prompt ends with <|im_start|> + the assistant role tokens + '\n' (unmarked)
    n_role = len(dict(st.roles)["assistant"])
    assert labels[-n_role - 2] == "<|im_start|>"
    assert all(label is not None for label in labels[-n_role - 1 : -1])
    assert labels[-1] is None
    # role words inside message text are not marked
    text_ids = chatml_tokenizer.encode("the user asked the assistant", add_special_tokens=False)
    assert not any(st.labels(text_ids))


def test_llama3_headers(llama3_tokenizer):
    st = resolve_special_tokens(llama3_tokenizer)
    names = dict(st.names)
    assert {names[i] for i in st.special_ids} == {
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    }
    assert set(dict(st.roles)) == {"system", "user", "assistant"}
    conv = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = _render(llama3_tokenizer, conv)
    labels = st.labels(ids)
    assert labels == _expected_labels(llama3_tokenizer, ids, st)
    marked = [label for label in labels if label is not None]
    assert marked[0] == "<|begin_of_text|>"
    assert marked[-1] == "<|end_header_id|>"
    assert (
        llama3_tokenizer.convert_tokens_to_string(marked[-len(dict(st.roles)["assistant"]) - 1 : -1])
        == "assistant"
    )
    assert labels[-1] is None  # the '\n\n' after the header


def test_stream_matches_full_mask_with_padding(chatml_tokenizer):
    st = resolve_special_tokens(chatml_tokenizer)
    convs = read_conversations(n=3)
    seqs = [_render(chatml_tokenizer, conv[:2]) for conv in convs]
    width = max(map(len, seqs)) + 2
    pad = chatml_tokenizer.pad_token_id
    ids = torch.full((3, width), pad)
    attn = torch.zeros((3, width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if row == 1:  # right padding for one row, left for the others
            ids[row, : len(seq)] = torch.tensor(seq)
            attn[row, : len(seq)] = 1
        else:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            attn[row, width - len(seq) :] = 1
    full = st.mask(ids, attn)
    for row in range(3):
        tokens, real = ids[row].tolist(), attn[row].bool().tolist()
        states = st.advance(OUTSIDE, tokens[:5], real[:5])
        for t in range(5, width):  # then one token at a time, the state carried over
            states += st.advance(states[-1], tokens[t : t + 1], real[t : t + 1])
        stepped = [s != OUTSIDE and r for s, r in zip(states, real, strict=True)]
        assert full[row].tolist() == stepped
    assert not full[attn == 0].any(), "padding (here the special <|im_end|>) is never marked"
    for row, seq in enumerate(seqs):
        alone = st.mask(torch.tensor(seq))
        assert torch.equal(full[row][attn[row].bool()], alone)


def test_marked_sequence_fed_in_pieces_matches_the_whole_mask(chatml_tokenizer):
    """Chunks, a skipped (cached) prefix read from the history, and a recomputed chunk: the marks of one whole
    forward, by absolute position."""
    st = resolve_special_tokens(chatml_tokenizer)
    seq = _render(chatml_tokenizer, read_conversations(n=1)[0][:3])
    whole = st.mask(torch.tensor(seq)).tolist()
    assert any(whole) and not all(whole)
    sequence = MarkedSequence(st)
    read = []
    start = 7  # positions 0..6 come from the prefix cache: never fed, read from the history
    for lo in range(start, len(seq), 5):
        chunk = list(range(lo, min(lo + 5, len(seq))))
        marks = sequence.marks(chunk, [seq[p] for p in chunk], lambda p: read.append(p) or seq[p])
        assert marks == [whole[p] for p in chunk]
    assert read == list(range(start)), "only the skipped prefix is read from the history"
    recomputed = list(range(3, 9))  # after preemption: positions seen before, fed again
    assert sequence.marks(recomputed, [seq[p] for p in recomputed], seq.__getitem__) == whole[3:9]
    back = SpecialTokens.from_dict(st.to_dict())  # as sent to vLLM workers
    assert (back.special_ids, back.roles, dict(back.names)) == (st.special_ids, st.roles, dict(st.names))


def test_extra_tokens_and_token_ids(chatml_tokenizer):
    newline = chatml_tokenizer.encode("\n", add_special_tokens=False)[0]
    st = resolve_special_tokens(chatml_tokenizer, extra=["\n"])
    assert newline in st.special_ids
    assert token_ids(chatml_tokenizer, ["<|im_start|>", newline]) == [
        chatml_tokenizer.convert_tokens_to_ids("<|im_start|>"),
        newline,
    ]
    with pytest.raises(ValueError, match="not a single token"):
        token_ids(chatml_tokenizer, ["several words here"])
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        token_ids(chatml_tokenizer, [10**6])


def test_no_chat_template_is_a_clear_error(chatml_tokenizer):
    import copy

    tok = copy.deepcopy(chatml_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        resolve_special_tokens(tok)


@pytest.mark.integration
def test_smollm2_roles(default_model):
    _, tok = default_model
    st = resolve_special_tokens(tok)
    assert st.special_ids == (1, 2)
    assert dict(st.to_dict()["role_tokens"])["assistant"] == ["ass", "istant"]
    ids = _render(tok, [{"role": "user", "content": "Hi"}])
    assert [label for label in st.labels(ids) if label][-3:] == ["<|im_start|>", "ass", "istant"]


def test_pad_token_id_is_pad_else_eos_else_a_clear_error(chatml_tokenizer):
    import copy

    from steer.errors import ConfigError
    from steer.positions import pad_token_id

    assert pad_token_id(chatml_tokenizer) == chatml_tokenizer.pad_token_id
    tok = copy.deepcopy(chatml_tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None and pad_token_id(tok) == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ConfigError, match="neither a pad nor an eos token"):
        pad_token_id(tok)


def test_without_sink_unmarks_position_0_only():
    from steer.positions import SINK_POSITION, without_sink

    mask = torch.tensor([[True, True, False], [True, False, True]])
    out = without_sink(mask)
    assert out.tolist() == [[False, True, False], [False, False, True]] and SINK_POSITION == 0
    assert mask[:, 0].all(), "the input is left as it was"
    assert without_sink(torch.ones(0, dtype=torch.bool)).numel() == 0

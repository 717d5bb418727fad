"""A row's tokens as text events: partial UTF-8 characters and possible stop strings are held back, a stop
string cuts the reply (and its logprobs) where it starts, end of turn and max tokens finish the row."""

from __future__ import annotations

from apps.serve.rows import Delta, Finish, Row, RowDecoder
from apps.serve.sampling import SamplingParams, TokenLogprob

TEXT = "Café 😀 is open. STOP here"


def _decode(tok, ids, **params) -> tuple[list, RowDecoder]:
    events: list = []
    row = Row(
        [], SamplingParams(max_new_tokens=params.pop("max_new_tokens", 100), **params), None, events.append
    )
    decoder = RowDecoder(row, tok, frozenset({tok.eos_token_id}))
    for token in ids:
        if decoder.done:
            break
        decoder.push(token, TokenLogprob(-0.5, ((token, -0.5),)))
    return events, decoder


def test_partial_characters_are_held_back(chatml_tokenizer):
    ids = chatml_tokenizer(TEXT)["input_ids"]
    assert any("\ufffd" in chatml_tokenizer.decode(ids[:n]) for n in range(len(ids))), "emoji spans tokens"
    events, decoder = _decode(chatml_tokenizer, [*ids, chatml_tokenizer.eos_token_id], logprobs=1)
    deltas = [e for e in events if isinstance(e, Delta)]
    assert all("\ufffd" not in d.text for d in deltas) and "".join(d.text for d in deltas) == TEXT
    assert events[-1] == Finish("stop", len(ids) + 1)
    assert len([e for d in deltas for e in d.logprobs]) == len(ids), "one entry per token, end of turn not"


def test_stop_string_cuts_reply_and_logprobs(chatml_tokenizer):
    ids = chatml_tokenizer(TEXT)["input_ids"]
    events, decoder = _decode(chatml_tokenizer, ids, stop=("STOP",), logprobs=0)
    deltas = [e for e in events if isinstance(e, Delta)]
    assert "".join(d.text for d in deltas) == "Café 😀 is open. "
    assert all("S" not in d.text for d in deltas), "text that may start the stop string is held back"
    entries = "".join(e.token for d in deltas for e in d.logprobs)
    # every token that starts before the cut, none after; partial characters read as U+FFFD
    assert entries.startswith("Caf") and " is open." in entries and "TOP" not in entries
    assert isinstance(events[-1], Finish) and events[-1].reason == "stop" and decoder.reason == "stop"


def test_max_tokens_and_cancel(chatml_tokenizer):
    ids = chatml_tokenizer(TEXT)["input_ids"]
    events, decoder = _decode(chatml_tokenizer, ids, max_new_tokens=3)
    assert events[-1] == Finish("length", 3) and len(decoder.tokens) == 3
    events, decoder = _decode(chatml_tokenizer, ids[:2])
    decoder.cancel()
    assert events[-1] == Finish("cancelled", 2) and decoder.done

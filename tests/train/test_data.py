"""Loading conversations and text: formats, malformed records, deterministic hash split."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import CHAT_DATA, PRETRAIN_DATA
from train.data import (
    DataFormatError,
    content_hash,
    is_held_out,
    load_conversations,
    load_texts,
    split_by_hash,
)


def _write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_three_conversation_formats(tmp_path):
    _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"instruction": "Add", "input": "1+1", "output": "2"},
            {"instruction": "Say yes", "input": "", "output": "yes", "system": "Be brief."},
            {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}]},
        ],
    )  # fmt: skip
    corpus = load_conversations(tmp_path / "mixed.jsonl")
    assert corpus.kind == "chat" and corpus.problems == []
    assert corpus[0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert corpus[1] == [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    assert corpus[2][0] == {"role": "system", "content": "Be brief."}
    assert corpus[2][1] == {"role": "user", "content": "Say yes"}
    assert [m["role"] for m in corpus[3]] == ["system", "user", "assistant"]


def test_json_array_file_and_folder_recursion(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    _write_jsonl(tmp_path / "b.jsonl", [{"instruction": "u", "output": "v"}])
    (tmp_path / "notes.md").write_text("ignored")
    corpus = load_conversations(tmp_path)
    assert [c[0]["content"] for c in corpus] == ["u", "x"]  # sorted paths: b.jsonl < sub/a.json
    assert len(corpus.sources) == 2


def test_malformed_lines_reported_with_file_and_line(tmp_path, caplog):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            good,
            "{not json",
            {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "",
            {"text": "wrong kind"},
            {"messages": [{"role": "user", "content": "only a question"}]},
            good,
        ],
    )
    with caplog.at_level(logging.WARNING, logger="train.data"):
        corpus = load_conversations(path)
    assert len(corpus) == 2
    assert [p.split(": ", 1)[0] for p in corpus.problems] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "invalid JSON" in corpus.problems[0]
    assert "unknown role 'wizard'" in corpus.problems[1]
    assert "skipped 4 malformed record(s)" in caplog.text
    assert corpus.describe()["skipped_records"] == 4

    with pytest.raises(DataFormatError, match=rf"^{path}:2: invalid JSON"):
        load_conversations(path, on_error="raise")


def test_texts_from_jsonl_and_txt(tmp_path):
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "first doc"}, {"text": ""}, {"text": "second doc"}])
    (tmp_path / "book.txt").write_text("a whole book\n")
    corpus = load_texts(tmp_path)
    assert corpus.kind == "text"
    assert list(corpus) == ["a whole book\n", "first doc", "second doc"]
    assert len(corpus.problems) == 1 and corpus.problems[0].startswith(f"{tmp_path / 't.jsonl'}:2:")


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing file or folder"):
        load_conversations(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="Hub is not reachable"):
        load_conversations("someone/some-dataset")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_conversations(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="on_error must be"):
        load_conversations(CHAT_DATA, on_error="ignore")


def test_hash_split_is_deterministic_disjoint_and_order_free():
    full = load_conversations(CHAT_DATA / "gsm8k_train.jsonl", limit=2000)
    train, held = split_by_hash(full.items, 0.1)
    assert len(train) + len(held) == len(full)
    assert 100 <= len(held) <= 300  # ~10 %
    train_hashes, held_hashes = {content_hash(c) for c in train}, {content_hash(c) for c in held}
    assert not train_hashes & held_hashes
    r_train, r_held = split_by_hash(list(reversed(full.items)), 0.1)
    assert {content_hash(c) for c in r_held} == held_hashes
    assert all(is_held_out(c, 0.1) for c in held) and not any(is_held_out(c, 0.1) for c in train)


def test_load_split_on_real_chat_data():
    kw = dict(held_out_fraction=0.05)
    held = load_conversations(CHAT_DATA, split="held_out", **kw)
    assert held.split == "held_out" and all(is_held_out(c, 0.05) for c in held)
    train = load_conversations(CHAT_DATA, split="train", limit=3000, **kw)
    assert not {content_hash(c) for c in held} & {content_hash(c) for c in train}
    total = 26683
    assert 0.03 * total < len(held) < 0.07 * total
    assert held.problems == []


def test_real_pretraining_text():
    corpus = load_texts(PRETRAIN_DATA / "us_presidential_speeches.jsonl")
    assert len(corpus) == 120 and all(isinstance(t, str) and t for t in corpus)


def test_shared_data_dir_honours_the_env_var_and_says_what_it_tried(tmp_path, monkeypatch):
    from train.data import SHARED_DATA_ENV, find_shared_data, shared_data_dir

    (tmp_path / "mine" / "chat").mkdir(parents=True)
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path / "mine"))
    assert shared_data_dir("chat") == tmp_path / "mine" / "chat"
    with pytest.raises(FileNotFoundError, match=f"tried {tmp_path / 'mine' / 'eval'}; set {SHARED_DATA_ENV}"):
        shared_data_dir("eval")  # the variable is the only place looked at when it is set
    assert find_shared_data("eval") is None


def test_shared_data_dir_looks_beside_the_working_directory_first(tmp_path, monkeypatch):
    from train.data import SHARED_DATA_ENV, shared_data_dir

    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    (tmp_path / "shared" / "data" / "chat").mkdir(parents=True)
    (tmp_path / "work" / "shared" / "data" / "chat").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert shared_data_dir("chat") == tmp_path / "shared" / "data" / "chat"  # <cwd>/../shared/data
    monkeypatch.chdir(tmp_path)
    assert shared_data_dir("chat") == tmp_path / "shared" / "data" / "chat"  # <cwd>/shared/data
    with pytest.raises(FileNotFoundError) as info:
        shared_data_dir("no-such-folder")
    # all three places are named, the source tree's last
    assert str(info.value).count("no-such-folder") == 4 and str(tmp_path.parent / "shared") in str(info.value)

"""FAST training and evaluation on every chat-template family, each with its own template: the sequences open
with the family's template tokens (Gemma 2's refused system message folded into the user turn), a tiny
`train.pipeline` run finishes and records the template, and the evaluation scores the family's Table 11 set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hub import load_sae
from steer.positions import resolve_special_tokens
from tests.chat_families import FAMILIES, NAMES, family_model, family_tokenizer
from tests.conftest import read_conversations
from train.config import SAETrainSpec, TrainConfig
from train.data import load_conversations
from train.evaluate import EvalConfig, evaluate_sae
from train.pipeline import train
from train.run_config import DataConfig, RunConfig, StreamSettings
from train.sequences import chat_template_sha256, fast_sequences

LAYER = 1
DATA = "synthetic_persona_chat.jsonl"  # every conversation opens with a system message
OPENING = {  # the first tokens of a FAST sequence of a conversation with a system message
    "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "s", "yst", "em", "<|end_header_id|>"],
    "qwen2.5": ["<|im_start|>", "s", "yst", "em"],
    "qwen3": ["<|im_start|>", "s", "yst", "em"],
    "gemma2": ["<bos>", "<start_of_turn>", "us", "er"],  # folded into the first user turn
    "gemma3": ["<bos>", "<start_of_turn>", "us", "er"],
    "mistral": ["<s>", "[INST]"],
    "phi3": ["<|system|>"],
    "phi4-mini": ["<|system|>"],
}


@pytest.mark.parametrize("name", NAMES)
def test_fast_sequences_open_with_the_family_template(name):
    family, tok = FAMILIES[name], family_tokenizer(name)
    convs = read_conversations(DATA, 8)
    assert all(c[0]["role"] == "system" for c in convs)
    st = resolve_special_tokens(tok)
    for seq in fast_sequences(convs, tok, max_len=4096):
        assert tok.convert_ids_to_tokens(seq[: len(OPENING[name])]) == OPENING[name]
        marked = {label for label in st.labels(seq) if label is not None}
        assert set(family.table11) <= marked, "every sequence holds the family's Table 11 special tokens"


@pytest.mark.parametrize("name", NAMES)
def test_fast_training_and_evaluation(name, tmp_path):
    family, tok = FAMILIES[name], family_tokenizer(name)
    model = family_model(name)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in read_conversations(DATA, 60)))
    cfg = TrainConfig(total_tokens=2048, batch_size=128, saes=[SAETrainSpec(expansion=2)], lr=1e-3, lr_end=1e-4,
                      checkpoint_every=0)  # fmt: skip
    run = RunConfig(layer=LAYER, training=cfg, device="cpu", data=DataConfig(chat=[str(data)], held_out_fraction=0.2),
                    stream=StreamSettings(buffer_tokens=512, token_budget=1024, max_len=256))  # fmt: skip
    result = train(run, tmp_path / "sae", loaded=(model, tok), progress=False)
    folder = Path(result.sae_dirs[0])
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["method"] == "FAST" and meta["chat_template_sha256"] == chat_template_sha256(tok)
    assert meta["training"]["tokens_trained"] == 2048
    held = list(load_conversations([str(data)], split="held_out", held_out_fraction=0.2))
    assert held
    res = evaluate_sae(load_sae(folder), model, tok, held, LAYER, EvalConfig(max_len=256), progress=False)
    assert set(res.special_tokens["paper_table_11"]["special_tokens"]) == set(family.table11)
    assert math.isfinite(res.metrics["mse_st"]) and res.metrics["mse_st"] > 0
    assert 0 < res.metrics["l0"] <= load_sae(folder).d_sae and "delta_lm_loss" in res.metrics

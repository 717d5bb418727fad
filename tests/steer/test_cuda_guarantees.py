"""The steering guarantees on CUDA (the GPU acceptance kit runs these): KV cache = recompute, mixed rows,
threads isolated, hidden states; the same checks as on CPU, with the tiny models and their inputs on CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.steer.test_placement import check_hidden_states_show_the_edit, check_threads_get_their_own_edits
from tests.steer.test_steered_model import check_cache_equals_recompute, check_mixed_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def cuda_model(tiny_model):
    """A tiny model on CUDA, with new tensors (the checks' inputs) made on CUDA too."""
    model, tok = tiny_model
    with torch.device("cuda"):
        yield model.to("cuda"), tok


@pytest.mark.parametrize("positions", ["special", "generated"])
def test_cuda_kv_cache_equals_recompute(cuda_model, positions):
    check_cache_equals_recompute(*cuda_model, positions)


def test_cuda_mixed_rows(cuda_model):
    check_mixed_rows(*cuda_model)


def test_cuda_threads_isolated(cuda_model):
    check_threads_get_their_own_edits(*cuda_model)


def test_cuda_hidden_states_show_the_edit(cuda_model):
    check_hidden_states_show_the_edit(*cuda_model)

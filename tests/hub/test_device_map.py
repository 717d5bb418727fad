"""A model larger than one device: loaded with a device map whose `max_memory` leaves room for the embeddings
and one block, the later blocks wait offloaded on disk (their weights on `meta`), yet steering (outputs and the
steered positions) and harvesting equal the unsplit model's; and `DeviceMap`'s input checks."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import compute_module_sizes

from hub import DeviceMap, load_model
from hub.device_map import parse_max_memory, size_bytes
from steer import Edit, Intervention, SteeredModel
from steer.errors import ConfigError
from steer.hooks import decoder_layers, input_device, layer_device
from tests.conftest import save_tiny_model
from tests.steer.helpers import chat_ids, pad_batch, random_sae
from train.harvest import Harvester
from train.sequences import make_batch

N_LAYERS = 4
OFFLOADED = 2  # a block whose weights wait on disk until it runs
PROMPTS = ["Tell me a story about a cat", "Hi"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, chatml_tokenizer):
    """(unsplit, split) loads of one tiny Llama; the split one keeps the embeddings and block 0 on the CPU."""
    root = tmp_path_factory.mktemp("device-map")
    model = save_tiny_model(root / "model", chatml_tokenizer, n_layers=N_LAYERS)
    sizes = compute_module_sizes(model)
    # room for the embeddings, the largest module accelerate reserves beside them, and block 0
    budget = 2 * sizes["model.embed_tokens"] + sizes["model.layers.0"] + 1024
    split_map = DeviceMap("auto", {"cpu": str(budget)}, str(root / "offload"))
    return load_model(str(root / "model")), load_model(str(root / "model"), device_map=split_map)


def test_the_split_model_offloads_blocks_and_reports_where_they_run(models):
    plain, split = models
    placed = split.model.hf_device_map
    assert placed["model.embed_tokens"] == "cpu" and placed["model.layers.0"] == "cpu", placed
    assert placed[f"model.layers.{OFFLOADED}"] == "disk", placed
    blocks = decoder_layers(split.model)
    assert {p.device.type for p in blocks[OFFLOADED].parameters()} == {"meta"}, "the weights wait offloaded"
    assert {p.device.type for p in blocks[0].parameters()} == {"cpu"}
    assert layer_device(split.model, OFFLOADED) == torch.device("cpu"), "accelerate's execution device"
    assert input_device(split.model) == torch.device("cpu")
    assert layer_device(plain.model, OFFLOADED) == torch.device("cpu"), (
        "no device map: the parameters' device"
    )


def _specs(d_model: int) -> list[Intervention]:
    sae = random_sae(d_model, 96)
    with torch.no_grad():
        sae.W_dec.mul_(4.0)  # edits strong enough to change a greedy reply
    return [
        Intervention(layer=OFFLOADED, sae=sae, edits=[Edit(3, "add", 6.0), Edit(5, "scale", 4.0)],
                     positions="special"),
        Intervention(layer=0, sae=sae, edits=[Edit(7, "add", 3.0)], positions="prompt"),
    ]  # fmt: skip


def _inputs(loaded) -> dict[str, torch.Tensor]:
    tok = loaded.tokenizer
    ids, mask = pad_batch(chat_ids(tok, PROMPTS), tok.pad_token_id, side="left")
    return {"input_ids": ids, "attention_mask": mask}


def _generate(loaded, specs) -> tuple[torch.Tensor, list[int]]:
    sm = SteeredModel(loaded.model, loaded.tokenizer)
    with sm.steer(specs) as report, torch.no_grad():
        out = sm.generate(**_inputs(loaded), max_new_tokens=8, do_sample=False,
                          pad_token_id=loaded.tokenizer.pad_token_id)  # fmt: skip
    return out, report.per_spec


def test_steered_generation_equals_the_unsplit_model(models):
    plain, split = models
    specs = _specs(plain.model.config.hidden_size)
    expected, expected_counts = _generate(plain, specs)
    got, counts = _generate(split, specs)
    assert torch.equal(got, expected)
    assert counts == expected_counts and all(counts), "both specs edited, the same positions"
    unsteered, _ = _generate(plain, [])
    assert not torch.equal(unsteered, expected), "the edits change the greedy replies"


def _steered_forward(loaded, spec: Intervention) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of a steered forward, and the mask of positions whose block-`spec.layer` output the spec
    changed (its placement)."""
    sm = SteeredModel(loaded.model, loaded.tokenizer)
    inputs = _inputs(loaded)
    with torch.no_grad():
        before = sm(**inputs, output_hidden_states=True).hidden_states[spec.layer + 1]
        with sm.steer(spec):
            out = sm(**inputs, output_hidden_states=True)
    changed = (out.hidden_states[spec.layer + 1] - before).abs().sum(-1) > 0
    return out.logits, changed


def test_steered_logits_and_positions_equal_the_unsplit_model(models):
    plain, split = models
    spec = _specs(plain.model.config.hidden_size)[0]
    logits, mask = _steered_forward(plain, spec)
    split_logits, split_mask = _steered_forward(split, spec)
    assert torch.equal(split_mask, mask)
    assert mask.any() and not mask.all(), "special positions only"
    torch.testing.assert_close(split_logits, logits, rtol=0, atol=1e-6)
    sae = spec.sae
    assert sae.device == layer_device(split.model, OFFLOADED), "the SAE sits where its layer runs"


@pytest.mark.parametrize("layer", [0, OFFLOADED])
def test_harvesting_equals_the_unsplit_model(models, layer):
    plain, split = models
    batch = make_batch(chat_ids(plain.tokenizer, PROMPTS), plain.tokenizer.pad_token_id)
    expected = Harvester(plain.model, layer).per_sequence(batch)
    got = Harvester(split.model, layer).per_sequence(batch)
    assert [len(x) for x in got] == batch.lengths
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_max_memory_parses_devices_and_sizes():
    assert parse_max_memory(["0=20GiB", "CPU = 60GiB", "disk=1000"]) == {"0": "20GiB", "cpu": "60GiB",
                                                                        "disk": "1000"}  # fmt: skip
    assert DeviceMap.parse("auto", ["0=1.5GB", "cpu=2MiB"]).from_pretrained_kwargs() == {
        "device_map": "auto",
        "max_memory": {0: 1_500_000_000, "cpu": 2 * 2**20},
    }
    assert size_bytes("3kib") == 3072 and size_bytes("7") == 7


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["cpu:60GiB"], "expected DEVICE=SIZE, e.g. 0=20GiB or cpu=60GiB"),
        (["gpu=20GiB"], "unknown device 'gpu'"),
        (["0=lots"], "'lots' is not a size"),
        (["cpu=1GiB", "cpu=2GiB"], "device 'cpu' given twice"),
    ],
)
def test_malformed_max_memory_names_the_expected_form(items, expected):
    with pytest.raises(
        ConfigError, match="DEVICE=SIZE" if "given twice" not in expected else "twice"
    ) as info:
        parse_max_memory(items)
    assert expected in str(info.value)


def test_an_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ConfigError, match="expected one of auto, balanced, balanced_low_0, sequential"):
        DeviceMap("everywhere")


@pytest.mark.integration
def test_the_default_model_loads_split(default_model, tmp_path):
    """`default` (converted from the GGUF once, then a safetensors folder) takes a device map like any folder."""
    split = load_model("default", device_map=DeviceMap("auto", {"cpu": "200MB"}, str(tmp_path)))
    assert "disk" in split.model.hf_device_map.values()
    ids = torch.tensor([chat_ids(split.tokenizer, ["Hello there"])[0]])
    with torch.no_grad():
        expected, got = (m.model(ids).logits for m in (default_model, split))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

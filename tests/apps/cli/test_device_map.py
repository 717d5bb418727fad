"""`--device-map` / `--max-memory` / `--offload-folder` on the commands that run a model: `chat` with its later
blocks offloaded to disk replies as without a map, `train` records the map, the lm-eval model takes it; bad
values and conflicting options give clear errors."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from apps.cli import main
from hub import DeviceMap, save_sae
from steer.errors import ConfigError
from tests.conftest import save_tiny_model
from tests.steer.helpers import random_sae
from train.run_config import RunConfig


@pytest.fixture(scope="module")
def saved(tmp_path_factory, chatml_tokenizer):
    """(root with the model folder and the SAE folder of block 2, a --max-memory that offloads blocks 1..)."""
    from accelerate.utils import compute_module_sizes

    root = tmp_path_factory.mktemp("cli-device-map")
    model = save_tiny_model(root / "model", chatml_tokenizer, n_layers=4)
    sae = random_sae(model.config.hidden_size, 32)
    sae.cfg.metadata["hook_name"] = "blocks.2.hook_resid_post"
    save_sae(sae, root / "sae")
    sizes = compute_module_sizes(model)
    budget = (
        2 * sizes["model.embed_tokens"] + sizes["model.layers.0"] + 1024
    )  # see tests/hub/test_device_map.py
    return root, f"cpu={budget}"


def _chat(root, *extra: str):
    args = ["chat", "--model", str(root / "model"), "--sae", str(root / "sae"), "--feature", "3",
            "--strength", "60", "--max-new-tokens", "6", "--json", *extra, "Tell me a story"]  # fmt: skip
    return CliRunner().invoke(main, args)


def test_chat_with_offloaded_blocks_replies_as_without_a_map(saved, caplog):
    root, max_memory = saved
    plain = _chat(root)
    assert plain.exit_code == 0, plain.output
    offload = root / "offload"
    split = _chat(root, "--device-map", "auto", "--max-memory", max_memory, "--offload-folder", str(offload))
    assert split.exit_code == 0, split.output
    assert re.search("offloaded to the .*disk", caplog.text), "accelerate says some weights wait on disk"
    expected, got = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (plain, split))
    assert got == expected
    assert got["steered"] != got["unsteered"] and got["steered_positions"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device-map", "auto", "--max-memory", "cpu:1GiB"], "expected DEVICE=SIZE, e.g. 0=20GiB or cpu=60GiB"),
        (["--device-map", "auto", "--max-memory", "cpu=plenty"], "'plenty' is not a size"),
        (["--device-map", "everywhere"], "expected one of auto, balanced, balanced_low_0, sequential"),
        (["--device-map", "auto", "--device", "cpu"], "--device-map auto places the model itself"),
        (["--max-memory", "cpu=1GiB"], "--max-memory applies only with --device-map"),
    ],
)  # fmt: skip
def test_bad_device_map_options_are_refused_before_loading(saved, extra, message):
    root, _ = saved
    result = CliRunner().invoke(main, ["chat", "--model", str(root / "missing"), "--feature", "1",
                                       "--sae", str(root / "sae"), *extra, "Hi"])  # fmt: skip
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output


def test_train_records_the_device_map_in_its_run_config(tmp_path):
    result = CliRunner().invoke(main, ["train", "--dry-run", "--layer", "1", "--data", str(tmp_path),
                                       "--device-map", "auto", "--max-memory", "0=20GiB", "--max-memory",
                                       "cpu=60GiB"])  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads(result.output)
    recorded = RunConfig.from_dict({k: v for k, v in run.items() if k not in ("schedule", "initialisation")})
    assert recorded.device_map == DeviceMap("auto", {"0": "20GiB", "cpu": "60GiB"}), "read back from a record"
    assert run["device_map"] == {"strategy": "auto", "max_memory": {"0": "20GiB", "cpu": "60GiB"},
                                 "offload_folder": None}  # fmt: skip


def test_the_lm_eval_model_takes_a_device_map_from_its_model_args(saved):
    from apps.evaluation.lm_eval.model import FastSteerLM

    root, max_memory = saved
    lm = FastSteerLM(pretrained=str(root / "model"), device_map="auto", max_memory=max_memory,
                     offload_folder=str(root / "offload-lm"))  # fmt: skip
    assert "disk" in lm.steered.model.hf_device_map.values()
    with pytest.raises(ConfigError, match="apply only with device_map"):
        FastSteerLM(pretrained=str(root / "model"), max_memory=max_memory)


def test_lm_eval_refuses_a_device_map_beside_its_own_device():
    result = CliRunner().invoke(main, ["lm-eval", "--device-map", "auto", "--device", "cpu", "--model_args",
                                       "pretrained=default", "--tasks", "arc_easy"])  # fmt: skip
    assert result.exit_code != 0
    assert "conflicts with lm-eval's --device cpu" in result.output

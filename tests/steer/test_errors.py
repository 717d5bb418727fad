"""One error family: every domain error is a `FastSteerError` (keeping its builtin base), the CLI prints a
`FastSteerError` from a capability as one clean line, and any other exception keeps its traceback."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import steer
from apps.cli import main
from apps.demo.settings import DemoInputError
from hub import HubUnavailableError, ModelResolutionError, SAEFormatError, save_sae
from steer.errors import ConfigError, FastSteerError, MissingFileError, OutputExistsError
from steer.sae import SAEConfig, build_sae
from steer.spec import SpecError
from train.data import DataFormatError

DOMAIN_ERRORS = {
    SpecError: ValueError,
    ModelResolutionError: RuntimeError,
    SAEFormatError: ValueError,
    HubUnavailableError: RuntimeError,
    DataFormatError: ValueError,
    DemoInputError: ValueError,
    ConfigError: ValueError,
    MissingFileError: FileNotFoundError,
    OutputExistsError: FileExistsError,
}


@pytest.mark.parametrize("error", DOMAIN_ERRORS, ids=lambda e: e.__name__)
def test_every_domain_error_is_a_fast_steer_error_and_keeps_its_builtin_base(error):
    exc = error("what was wrong")
    assert isinstance(exc, FastSteerError) and isinstance(exc, DOMAIN_ERRORS[error])
    assert str(exc) == "what was wrong"


def test_fast_steer_error_is_exported_from_steer():
    assert steer.FastSteerError is FastSteerError and "FastSteerError" in steer.__all__


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    """A random SAE folder that names its layer (enough for `fast-steer eval` to reach the data)."""
    folder = tmp_path_factory.mktemp("errors") / "sae"
    meta = {"hook_name": "blocks.1.hook_resid_post", "model_name": "unused"}
    torch.manual_seed(0)
    save_sae(build_sae(SAEConfig(architecture="standard", d_in=8, d_sae=16, metadata=meta)), folder)
    return folder


def test_cli_prints_a_capability_error_as_one_clean_line(sae_dir, tmp_path):
    missing = tmp_path / "no-such-data"
    result = CliRunner().invoke(main, ["eval", str(sae_dir), "--data", str(missing), "--quiet"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), "the error was turned into click's clean exit"
    assert result.output == f"Error: data source {str(missing)!r} is not an existing file or folder" + (
        " or a Hugging Face dataset id 'owner/name[:split]'\n"
    )
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "bug",
    [
        RuntimeError("CUDA out of memory"),
        KeyError("metadata"),
        ValueError("a plain ValueError is a bug, not bad input"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_cli_does_not_swallow_a_bug_into_one_line(sae_dir, tmp_path, monkeypatch, bug):
    import train.eval_run

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(train.eval_run, "evaluate_folder", broken)
    result = CliRunner().invoke(main, ["eval", str(sae_dir), "--data", str(tmp_path), "--quiet"])
    assert result.exit_code == 1
    assert result.exception is bug, "the bug reaches the caller as it was raised"
    assert "Error:" not in result.output

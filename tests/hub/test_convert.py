"""Pickle-only releases: refused by default with the command to run; `fast-steer convert --allow-pickle`
checks the hash, scans the opcodes (refusing, without executing, anything but a tensor state dict), loads
in a subprocess and writes a SAELens v6 folder that loads without pickle."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from click.testing import CliRunner

from apps.cli import main
from hub import SAEFormatError, load_sae
from hub.convert import convert_pickle, scan_pickle

D, F = 8, 32


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _w(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.4


X = torch.randn(10, D, generator=torch.Generator().manual_seed(99)) * 2


def test_pickle_releases_are_refused_by_default(tmp_path):
    with pytest.raises(SAEFormatError, match=r"stored only as a pickle.*fast-steer convert --allow-pickle"):
        load_sae("goodfire-llama-3.1-8b-instruct:layer_19")
    folder = tmp_path / "resid_post_layer_3" / "trainer_1"
    folder.mkdir(parents=True)
    torch.save({"encoder.weight": _w(0, F, D)}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE"}}))
    with pytest.raises(SAEFormatError, match=r"never loads by default.*convert --allow-pickle .*ae\.pt"):
        load_sae(folder)


def test_convert_goodfire(tmp_path):
    src = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    state = {
        "encoder_linear.weight": _w(1, F, D),
        "encoder_linear.bias": _w(2, F),
        "decoder_linear.weight": _w(3, D, F) * 3,  # rows not unit-norm: kept as they are
        "decoder_linear.bias": _w(4, D),
    }
    torch.save(state, src)
    result = CliRunner().invoke(
        main, ["convert", "--allow-pickle", str(src), "--out", str(tmp_path / "out"), "--sha256", _sha(src)]
    )
    assert result.exit_code == 0, result.output
    sae = load_sae(tmp_path / "out")
    assert (sae.architecture, sae.layer, sae.metadata["converted_from"]) == ("standard", 19, "goodfire")
    expected = torch.relu(X @ state["encoder_linear.weight"].T + state["encoder_linear.bias"])
    assert (sae.encode(X) - expected).abs().max() <= 1e-5
    assert torch.equal(sae.W_dec, state["decoder_linear.weight"].T)


def test_convert_dictionary_learning_batch_topk(tmp_path):
    src = tmp_path / "ae.pt"
    state = {
        "encoder.weight": _w(5, F, D),
        "encoder.bias": _w(6, F),
        "decoder.weight": _w(7, D, F),
        "b_dec": _w(8, D),
        "k": torch.tensor(4, dtype=torch.int32),
        "threshold": torch.tensor(0.2),
    }
    torch.save(state, src)
    trainer = {
        "dict_class": "BatchTopKSAE",
        "activation_dim": D,
        "dict_size": F,
        "k": 4,
        "layer": 3,
        "lm_name": "tiny",
    }
    (tmp_path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 1024}}))
    convert_pickle(src, tmp_path / "out", _sha(src), allow_pickle=True)
    sae = load_sae(tmp_path / "out")
    post = torch.relu((X - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"])
    expected = post * (post > 0.2)  # dictionary_learning BatchTopKSAE.encode(use_threshold=True)
    assert (sae.encode(X) - expected).abs().max() <= 1e-5
    assert (sae.architecture, sae.layer, sae.metadata["model_name"]) == ("jumprelu", 3, "tiny")


def test_convert_qwen_scope(tmp_path):
    src = tmp_path / "layer5.sae.pt"
    state = {"W_enc": _w(9, F, D), "W_dec": _w(10, D, F), "b_enc": _w(11, F), "b_dec": _w(12, D)}
    torch.save(state, src)
    with pytest.raises(SAEFormatError, match="converting .* failed: .*k is read from the config.json"):
        convert_pickle(src, tmp_path / "no-k", _sha(src), allow_pickle=True)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "topk_sae", "d_model": D, "d_sae": F, "k": 5})
    )
    convert_pickle(src, tmp_path / "out", _sha(src), allow_pickle=True)
    sae = load_sae(tmp_path / "out")
    pre = X @ state["W_enc"].T + state["b_enc"]
    top = pre.topk(5, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    assert (sae.architecture, sae.cfg.k, sae.layer) == ("topk", 5, 5)
    assert (sae.encode(X) - expected).abs().max() <= 1e-5


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forbidden_opcode_refused_without_executing(tmp_path):
    marker = tmp_path / "executed"
    src = tmp_path / "evil.pt"
    torch.save({"W_enc": _w(0, F, D), "x": _Payload(str(marker))}, src)
    with pytest.raises(SAEFormatError, match=r"refused: the pickle refers to (posix|os)\.system"):
        scan_pickle(src)
    with pytest.raises(SAEFormatError, match="refused"):
        convert_pickle(src, tmp_path / "out", _sha(src), allow_pickle=True)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_checks_hash_and_opt_in(tmp_path):
    src = tmp_path / "ae.pt"
    torch.save({"encoder.weight": _w(0, F, D)}, src)
    with pytest.raises(SAEFormatError, match="SHA-256 is .* but 00 was given"):
        convert_pickle(src, tmp_path / "out", "00", allow_pickle=True)
    result = CliRunner().invoke(
        main, ["convert", str(src), "--out", str(tmp_path / "out"), "--sha256", _sha(src)]
    )
    assert result.exit_code == 1 and "needs the explicit opt-in --allow-pickle" in result.output

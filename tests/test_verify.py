"""``tinytrain verify``: every shared model agrees with its format's reference interpreter; a model
whose weights change after import does not; a missing reference package is a one-line error."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from conftest import small_cnn

from tvm_tinytrain import cli, verify, zoo

SHARED = [
    "vww_96_float.tflite",
    pytest.param("vww_96_int8.tflite", marks=pytest.mark.slow),  # minutes to compile its int8 graph
    "resnet8_cifar10_float.tflite",
    pytest.param("resnet8_cifar10_int8.tflite", marks=pytest.mark.slow),
    "toycar_ad_float.tflite",
    "toycar_ad_weight_int8.tflite",
    "toycar_ad_int8_float_io.tflite",
]


def _verify(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["verify", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", SHARED)
def test_every_shared_model_agrees_with_its_reference(shared_model, capsys, name):
    code, out, _ = _verify(capsys, shared_model(name), "--json")
    report = json.loads(out)
    assert code == 0, report
    assert report["passed"] and report["samples"] == 100
    if "int8" in name and "weight" not in name:
        assert report["mode"] == "int8" and report["lsb_histogram"][">2"] == 0
    if "weight_int8" in name:  # LiteRT's hybrid kernels: a looser tolerance, said so
        assert report["mode"] == "hybrid" and "hybrid" in report["reference"]
    if name.startswith("toycar"):
        assert report["top1_agreement"] is None and not report["classification"]
    else:
        assert report["top1_agreement"] >= 0.99


def _perturbed(monkeypatch, name: str, change):
    """``verify`` imports the model, then ``change`` alters parameter ``name`` (after the import, so
    the file itself still is what the reference reads)."""
    real = verify.load_model

    def load(*args, **kwargs):
        mod, params = real(*args, **kwargs)
        params = dict(params)
        params[name] = change(params[name])
        return mod, params
    monkeypatch.setattr(verify, "load_model", load)


def test_a_float_model_changed_after_import_disagrees(tmp_path, capsys, monkeypatch):
    path = tmp_path / "small.onnx"
    onnx.save(small_cnn(), path)
    code, out, _ = _verify(capsys, path, "--samples", 20)
    assert code == 0 and out.startswith("AGREE"), out  # the control: the same check can pass
    _perturbed(monkeypatch, "linear4.weight", lambda w: w * 1.01)
    code, out, _ = _verify(capsys, path, "--samples", 20)
    assert code == 1 and out.startswith("DISAGREE"), out


def test_an_int8_qdq_model_agrees_and_a_changed_bias_does_not(tmp_path, capsys, monkeypatch):
    path = tmp_path / "small_int8.onnx"
    onnx.save(zoo.quantize_qdq(small_cnn()), path)
    code, out, _ = _verify(capsys, path, "--samples", 50, "--json")
    report = json.loads(out)
    assert code == 0 and report["mode"] == "int8", report
    assert "QUANTIZE range" in report["inputs"]  # the file quantizes float input itself
    _perturbed(monkeypatch, "conv0.bias", lambda b: b + np.int32(5000))
    code, out, _ = _verify(capsys, path, "--samples", 50, "--json")
    report = json.loads(out)
    assert code == 1 and not report["passed"]
    assert report["lsb_histogram"][">2"] > 0


@pytest.mark.parametrize("module, model", [("onnxruntime", "onnx"), ("ai_edge_litert.interpreter", "tflite")])
def test_a_missing_reference_package_is_one_line(tmp_path, shared_model, capsys, monkeypatch, module, model):
    if model == "onnx":
        path = tmp_path / "small.onnx"
        onnx.save(small_cnn(), path)
    else:
        path = shared_model("toycar_ad_float.tflite")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    code, out, err = _verify(capsys, path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and 'pip install "tvm-tinytrain[verify]"' in err, err


def test_samples_below_one_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "small.onnx"
    onnx.save(small_cnn(), path)
    code, _, err = _verify(capsys, path, "--samples", 0)
    assert code == 2 and "--samples" in err and err.count("\n") == 1

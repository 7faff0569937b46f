"""The ``tinytrain`` command: help texts, ``summary`` (table and JSON), ``demo``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tvm_tinytrain import zoo
from tvm_tinytrain.cli import main

TINYTRAIN = shutil.which("tinytrain") or str(Path(sys.executable).with_name("tinytrain"))


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr); argparse's exit included."""
    try:
        code = main(list(argv))
    except SystemExit as done:
        code = done.code
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_help():
    proc = subprocess.run([TINYTRAIN, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: tinytrain" in proc.stdout
    for word in ("summary", "demo", "examples:"):
        assert word in proc.stdout


@pytest.mark.parametrize("command, words", [
    ("summary", ["model", "--json", ".tflite", ".onnx", "numbered"]),
    ("demo", ["--epochs", "--pretrain-epochs", "--lr", "--seed", "--quiet", "--json", "digits"]),
])
def test_subcommand_help(capsys, command, words):
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: tinytrain {command}")
    for word in words:
        assert word in out


def test_no_command_is_a_usage_error(capsys):
    code, out, err = run_main(capsys)
    assert code == 2 and out == "" and "usage: tinytrain" in err


def zoo_file(tmp_path, model: onnx.ModelProto) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def test_summary_table(capsys, small_onnx):
    code, out, err = run_main(capsys, "summary", str(small_onnx))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{small_onnx}: input input (1, 1, 8, 8) float32"
    rows = [line.split() for line in lines if re.match(r"\s*\d+\s+(conv|dwconv|linear)\s", line)]
    assert [int(row[0]) for row in rows] == list(range(5))
    assert [row[1] for row in rows] == ["conv", "conv", "dwconv", "conv", "linear"]
    assert lines[-1].startswith(f"5 layers, {zoo.count_macs(zoo.small_cnn()):,} MACs")


@pytest.mark.parametrize("name, build", [
    ("small_cnn", lambda: zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=8)),
    ("small_cnn_rgb", lambda: zoo.small_cnn(num_classes=4, input_hw=(16, 16), in_channels=3, width=4)),
    ("mobilenet_v2_bn_64", lambda: zoo.mobilenet_v2(resolution=64, batchnorm=True)),
])
def test_summary_json(capsys, tmp_path, name, build):
    model = build()
    code, out, _ = run_main(capsys, "summary", str(zoo_file(tmp_path, model)), "--json")
    assert code == 0
    info = json.loads(out)
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    layers = info["layers"]
    assert [layer["index"] for layer in layers] == list(range(len(convs)))
    assert {layer["kind"] for layer in layers} <= {"conv", "dwconv", "linear"}
    assert layers[-1]["kind"] == "linear"
    assert sum(layer["macs"] for layer in layers) == zoo.count_macs(model)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert info["input"] == {"name": "input", "shape": dims, "dtype": "float32"}
    if "bn" not in name:  # without BN every initializer but the Clip bounds is a parameter
        sizes = [t for t in model.graph.initializer if not t.name.startswith("relu6.")]
        assert info["parameters"] == sum(onnx.numpy_helper.to_array(t).size for t in sizes)


def test_summary_resnet8_tflite(capsys, shared_model):
    code, out, _ = run_main(capsys, "summary", str(shared_model("resnet8_cifar10_float.tflite")),
                            "--json")
    assert code == 0
    info = json.loads(out)
    assert info["input"]["shape"] == [1, 32, 32, 3]
    kinds = [layer["kind"] for layer in info["layers"]]
    assert kinds == ["conv"] * 9 + ["linear"]
    assert [layer["index"] for layer in info["layers"]] == list(range(10))


def test_summary_user_error_is_one_line(capsys, tmp_path):
    code, out, err = run_main(capsys, "summary", str(tmp_path / "missing.tflite"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("tinytrain: error: ") and "missing.tflite" in err


def test_compile_then_create_project_and_build(small_onnx, tmp_path, capsys):
    from conftest import require_tools

    from tvm_tinytrain.cli import main

    out = tmp_path / "model.tar"
    args = ["compile", str(small_onnx), "--scheme", "last-k:2", "--budget", "256KB", "-o", str(out)]
    assert main(args) == 0
    assert out.is_file() and "SRAM planned" in capsys.readouterr().out
    require_tools("gcc", "make")
    assert main(["micro", "create-project", str(tmp_path / "p"), str(out), "host"]) == 0
    assert main(["micro", "build", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "build" / "tinytrain_host").is_file()


def test_compile_over_budget_is_one_line_and_writes_nothing(small_onnx, tmp_path, capsys):
    from tvm_tinytrain.cli import main

    out = tmp_path / "model"
    assert main(["compile", str(small_onnx), "--budget", "1KB", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinytrain: error: the training step needs") and err.count("\n") == 1
    assert not out.exists()


def test_memory_of_an_int8_file_and_of_its_dequantized_twin(capsys, shared_model):
    """``--dequantize`` trains the int8 file as float: float activations, 4x the int8 arena."""
    model = str(shared_model("resnet8_cifar10_int8.tflite"))
    arenas = {}
    for flags in ((), ("--dequantize",)):
        code, out, _ = run_main(capsys, "memory", model, "--scheme", "last-layer", "--no-tvm",
                                "--json", *flags)
        assert code == 0
        arenas[flags] = json.loads(out)["arena_bytes"]
    assert arenas[("--dequantize",)] > 3 * arenas[()], arenas
    code, _, err = run_main(capsys, "memory", model, "--dequantize", "--no-qas")
    assert code == 2 and "--dequantize builds a float model" in err


def test_headroom_requantizes_the_layer_it_names_at_no_memory_cost(capsys, shared_model, tmp_path):
    """``--headroom 8:1`` reaches the weights (the flash parameters change), not the plan;
    a layer that is not int8, bad syntax and a float twin are one-line errors."""
    model = str(shared_model("resnet8_cifar10_int8.tflite"))
    built = []
    for flags in ((), ("--headroom", "8:1")):
        out_dir = tmp_path / f"artifact{len(built)}"
        code, _, err = run_main(capsys, "compile", model, "--scheme", "last-layer", *flags,
                                "-o", str(out_dir))
        assert code == 0, err
        built.append(((out_dir / "src" / "tinytrain_params.c").read_text(),
                      json.loads((out_dir / "metadata.json").read_text())["memory"]))
    (plain_params, plain_memory), (params, memory) = built
    assert params != plain_params and memory == plain_memory
    code, _, err = run_main(capsys, "memory", model, "--headroom", "9:1", "--no-tvm")
    assert code == 2 and err.count("\n") == 1 and "9" in err and "not int8 conv or linear" in err, err
    for bad in ("8", "8:7", "conv8:1"):
        code, _, err = run_main(capsys, "memory", model, "--headroom", bad)
        assert code == 2 and "LAYER:BITS" in err, err
    code, _, err = run_main(capsys, "memory", model, "--dequantize", "--headroom", "8:1")
    assert code == 2 and "--dequantize builds a float model" in err

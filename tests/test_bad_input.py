"""Bad input gives a one-line error of the right type that names the culprit.

File-based cases also run ``tinytrain summary FILE``: exit 2, one ``tinytrain: error:``
line on stderr, no traceback.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import tflite
from onnx import TensorProto, helper
from tflite.BuiltinOperator import BuiltinOperator

import tvm_tinytrain as tt
from tvm_tinytrain import zoo
from tvm_tinytrain.errors import (
    InputError,
    ModelFormatError,
    ModelStructureError,
    SchemeError,
    UnsupportedOperatorError,
)


def one_line(excinfo, *names: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def cli_rejects(path, *names: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tvm_tinytrain.cli", "summary", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinytrain: error: "), proc.stderr
    for name in names:
        assert name in lines[0]


def rejects(path, error, *names: str) -> str:
    """load_model raises ``error`` naming ``names`` (one line), and so does the CLI."""
    with pytest.raises(error) as excinfo:
        tt.load_model(path)
    message = one_line(excinfo, *names)
    cli_rejects(path, *names)
    return message


def save(model: onnx.ModelProto, path):
    onnx.save(model, path)
    return path


def with_input_dims(dims: list) -> onnx.ModelProto:
    """small_cnn with its input dims replaced (str = symbolic, int = fixed)."""
    model = zoo.small_cnn()
    shape = model.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().CopyFrom(
            onnx.TensorShapeProto.Dimension(**({"dim_param": d} if isinstance(d, str) else {"dim_value": d}))
        )
    return model


def with_node_after_first_relu(op: str) -> onnx.ModelProto:
    """small_cnn with ``op`` (one output, reading the first Relu's output) spliced in."""
    model = zoo.small_cnn()
    nodes = model.graph.node
    relu = next(i for i, n in enumerate(nodes) if n.op_type == "Relu")
    out = nodes[relu].output[0]
    nodes[relu].output[0] = out + "_pre"
    inputs = [out + "_pre"] * (2 if op == "Concat" else 1)
    attrs = {"axis": 1} if op == "Concat" else {}
    nodes.insert(relu + 1, helper.make_node(op, inputs, [out], name="odd_one", **attrs))
    if op == "Concat":  # keep the model valid: the next conv now sees twice the channels
        conv = nodes[relu + 2]
        w = next(t for t in model.graph.initializer if t.name == conv.input[1])
        arr = onnx.numpy_helper.to_array(w)
        w.CopyFrom(onnx.numpy_helper.from_array(np.concatenate([arr, arr], axis=1), w.name))
    onnx.checker.check_model(model, full_check=True)
    return model


# ---- files that are not models -------------------------------------------------
@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_text_file_with_model_suffix(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_text("this is not a model\n")
    rejects(path, ModelFormatError, str(path))


def test_truncated_tflite(tmp_path, shared_model):
    path = tmp_path / "cut.tflite"
    path.write_bytes(shared_model("vww_96_float.tflite").read_bytes()[:1000])
    assert "truncated" in rejects(path, ModelFormatError, str(path))


def test_truncated_onnx(tmp_path, small_onnx):
    path = tmp_path / "cut.onnx"
    path.write_bytes(small_onnx.read_bytes()[:1000])
    assert "truncated" in rejects(path, ModelFormatError, str(path))


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.onnx"
    assert "no such file" in rejects(path, ModelFormatError, str(path))


# ---- models outside the supported set ---------------------------------------------
@pytest.mark.parametrize("op", ["Sigmoid", "Concat"])
def test_unsupported_onnx_op(tmp_path, op):
    path = save(with_node_after_first_relu(op), tmp_path / f"{op}.onnx")
    with pytest.raises(UnsupportedOperatorError) as excinfo:
        tt.load_model(path)
    one_line(excinfo, op, "odd_one", "supported: ")
    assert excinfo.value.op == op
    cli_rejects(path, op, "odd_one")


def test_unsupported_tflite_op(tmp_path, shared_model):
    """resnet8 with its AVERAGE_POOL_2D opcode patched to LOGISTIC in place."""
    data = bytearray(shared_model("resnet8_cifar10_float.tflite").read_bytes())
    model = tflite.Model.GetRootAsModel(data, 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    tab = next(c for c in codes if c.BuiltinCode() == BuiltinOperator.AVERAGE_POOL_2D)._tab
    data[tab.Pos + tab.Offset(4)] = BuiltinOperator.LOGISTIC  # deprecated_builtin_code, int8
    pos = tab.Pos + tab.Offset(10)  # builtin_code, int32
    data[pos:pos + 4] = BuiltinOperator.LOGISTIC.to_bytes(4, "little")
    path = tmp_path / "logistic.tflite"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedOperatorError) as excinfo:
        tt.load_model(path)
    one_line(excinfo, "TFLite op LOGISTIC", "average_pooling2d")
    cli_rejects(path, "LOGISTIC")


def test_two_inputs(tmp_path):
    model = zoo.small_cnn()
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 1, 8, 8]))
    path = save(model, tmp_path / "two.onnx")
    rejects(path, ModelStructureError, "2 inputs", "input, extra")


def test_dynamic_non_batch_dimension(tmp_path):
    path = save(with_input_dims(["N", 1, "H", 8]), tmp_path / "dyn.onnx")
    rejects(path, ModelStructureError, "input", "dynamic dimension H", "axis 2")


def test_dynamic_batch_is_bound_to_1(tmp_path):
    mod, params = tt.load_model(save(with_input_dims(["N", 1, 8, 8]), tmp_path / "dynb.onnx"))
    assert [int(d) for d in mod["main"].params[0].ty.shape] == [1, 1, 8, 8]
    assert len(tt.layer_table(mod)) == 5 and params


# ---- samples and labels handed to a trainer ---------------------------------------
@pytest.fixture
def x(small_trainer):
    return np.zeros(small_trainer.input_shape, np.float32)


@pytest.mark.parametrize("label", [10, -1])
def test_label_out_of_range_at_step(small_trainer, x, label):
    with pytest.raises(InputError) as excinfo:
        small_trainer.step(x, label)
    one_line(excinfo, f"label {label}", "10 classes", "0..9")


def test_label_out_of_range_in_evaluate(small_trainer, x):
    xs = np.zeros((3, *small_trainer.input_shape[1:]), np.float32)
    with pytest.raises(InputError) as excinfo:
        small_trainer.evaluate(xs, [0, 12, 3])
    one_line(excinfo, "0..9", "12")


@pytest.mark.parametrize("label", [2.5, 2.0, "cat"])
def test_non_integer_label_at_step(small_trainer, x, label):
    with pytest.raises(InputError) as excinfo:
        small_trainer.step(x, label)
    one_line(excinfo, repr(label), "integer")


def test_non_integer_labels_in_evaluate(small_trainer):
    xs = np.zeros((2, *small_trainer.input_shape[1:]), np.float32)
    with pytest.raises(InputError) as excinfo:
        small_trainer.evaluate(xs, [1.5, 2.0])
    one_line(excinfo, "integer", "float64")


@pytest.mark.parametrize("shape", [(1, 1, 9, 9), (1, 8, 8, 1), (8, 8)])
def test_wrong_input_shape_at_step(small_trainer, shape):
    with pytest.raises(InputError) as excinfo:
        small_trainer.step(np.zeros(shape, np.float32), 1)
    one_line(excinfo, str(shape), "(1, 1, 8, 8)")


@pytest.mark.parametrize("shape", [(1, 1, 9, 9), (1, 8, 8, 1)])
def test_wrong_input_shape_at_predict(small_trainer, shape):
    with pytest.raises(InputError) as excinfo:
        small_trainer.predict(np.zeros(shape, np.float32))
    one_line(excinfo, str(shape), "(1, 1, 8, 8)")


# ---- training settings --------------------------------------------------------------
@pytest.fixture
def small_mod(small_onnx):
    return tt.load_model(small_onnx)[0]


def test_unknown_scheme(small_mod):
    with pytest.raises(SchemeError) as excinfo:
        tt.relay.transform.TinyTrain(scheme="sparse-magic")(small_mod)
    one_line(excinfo, "'sparse-magic'", "full", "last-k:N")


def test_scheme_that_does_not_fit_the_model(small_mod):
    """Raised inside the TVM module pass: must still arrive as a SchemeError."""
    with pytest.raises(SchemeError) as excinfo:
        tt.relay.transform.TinyTrain(scheme="last-k:99")(small_mod)
    one_line(excinfo, "'last-k:99'", "1..5")


def test_unknown_loss(small_mod):
    with pytest.raises(SchemeError) as excinfo:
        tt.relay.transform.TinyTrain(loss="hinge")(small_mod)
    one_line(excinfo, "'hinge'", "cross_entropy", "mse")


# ---- scheme files: every field checked, a SchemeError naming it --------------------------
@pytest.mark.parametrize("text, names", [
    ("[]", ["JSON object", "an array"]),
    ("5", ["JSON object", "a number"]),
    ("null", ["JSON object", "null"]),
    ('"full"', ["JSON object", "a string"]),
    ('{"weights": [1.0, 0.5]}', ['"weights"', "an array"]),
    ('{"weights": {"1": 1e-300}}', ['"weights"', "layer 1", "16 output channels", "1/16 = 0.0625"]),
    ('{"weights": {"1": 0}}', ['"weights"', "layer 1", "(0, 1]"]),
    ('{"weights": {"1": 1.5}}', ['"weights"', "layer 1", "(0, 1]"]),
    ('{"weights": {"1": true}}', ['"weights"', "layer 1", "(0, 1]"]),
    ('{"weights": {"1": "half"}}', ['"weights"', "layer 1", "(0, 1]"]),
    ('{"weights": {"conv1": 1.0}}', ['"weights"', "'conv1'", "0..4"]),
    ('{"weights": {"-1": 1.0}}', ['"weights"', "'-1'", "0..4"]),
    ('{"weights": {"7": 1.0}}', ['"weights"', "layer 7", "0..4"]),
    ('{"weights": {"1": 1.0, "01": 0.5}}', ['"weights"', "layer 1 twice"]),
    ('{"bias": [3]}', ['"bias"', '{"last": N}']),
    ('{"bias": {"first": 2}}', ['"bias"', '{"last": N}']),
    ('{"bias": {"last": true}}', ['"bias"', "0..5"]),
    ('{"bias": {"last": 2.5}}', ['"bias"', "0..5"]),
    ('{"bias": {"last": 9}}', ['"bias"', "0..5"]),
    ('{"classifier": "yes"}', ['"classifier"', "true or false"]),
    ('{"clasifier": true}', ["clasifier", "bias, weights, classifier"]),
    ('{"bias": null, "weights": null, "classifier": false}', ["trains nothing"]),
])
def test_bad_scheme_file(small_mod, small_onnx, tmp_path, capsys, text, names):
    """A scheme file of the wrong shape is a one-line SchemeError (never a TVM traceback),
    from the library and from ``tinytrain memory --scheme FILE``."""
    from tvm_tinytrain.cli import main

    path = tmp_path / "scheme.json"
    path.write_text(text)
    with pytest.raises(SchemeError) as excinfo:
        tt.relay.transform.TinyTrain(scheme=str(path))(small_mod)
    one_line(excinfo, *names)
    assert main(["memory", str(small_onnx), "--scheme", str(path), "--no-tvm"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("tinytrain: error: "), err
    assert all(name in err for name in names), err


def test_scheme_ratio_that_gives_one_channel_is_accepted(small_mod):
    """The smallest ratio the message advises (1/16 for a 16-channel layer) trains one channel."""
    from tvm_tinytrain.layers import layer_table
    from tvm_tinytrain.scheme import resolve

    assert resolve({"weights": {"1": 1 / 16}}, layer_table(small_mod)) == {"conv1.weight": 1}


@pytest.mark.parametrize("content", [b"\xff\xfe not text", None])
def test_unreadable_scheme_file(small_mod, tmp_path, content):
    """Bytes that are not text, or a folder named like a scheme file: one line naming the file."""
    path = tmp_path / "scheme.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(SchemeError) as excinfo:
        tt.relay.transform.TinyTrain(scheme=str(path))(small_mod)
    one_line(excinfo, "scheme.json")

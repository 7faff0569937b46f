"""TFLite files converters write and files they never write, made with ``tflite_writer``:
float16 and weight-only int8 weights read as the float model they stand for (checked against
LiteRT and a float64 numpy forward), and damaged fields refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import litert_reference
from tvm import relax

import tvm_tinytrain as tt
from relay_passes.plain_calls import PlainTIRCalls
from tvm_tinytrain.tflite_writer import (
    CONV_2D,
    CONV_OPTIONS,
    DEQUANTIZE,
    FC_OPTIONS,
    FLOAT16,
    FLOAT32,
    FULLY_CONNECTED,
    INT8,
    Op,
    Tensor,
    write_model,
)

RNG = np.random.default_rng(0)
W1 = RNG.normal(0, 0.5, (8, 16)).astype(np.float32)  # (out, in)
B1 = RNG.normal(0, 0.1, 8).astype(np.float32)
W2 = RNG.normal(0, 0.5, (4, 8)).astype(np.float32)
B2 = RNG.normal(0, 0.1, 4).astype(np.float32)
RELU = [(0, "int8", 1)]  # FullyConnectedOptions.fused_activation_function


def _mlp(weight1: Tensor, extra: list[Tensor] = (), extra_ops: list[Op] = (), w1_index: int = 1) -> bytes:
    """x(1,16) → FC(8, ReLU) → FC(4): tensors 0 x, 1 w1, 2 b1, 3 h, 4 w2, 5 b2, 6 y, then extra."""
    tensors = [Tensor("x", (1, 16), FLOAT32), weight1, Tensor("b1", (8,), FLOAT32, B1),
               Tensor("h", (1, 8), FLOAT32), Tensor("w2", (4, 8), FLOAT32, W2),
               Tensor("b2", (4,), FLOAT32, B2), Tensor("y", (1, 4), FLOAT32), *extra]
    ops = [*extra_ops, Op(FULLY_CONNECTED, [0, w1_index, 2], [3], FC_OPTIONS, RELU),
           Op(FULLY_CONNECTED, [3, 4, 5], [6], FC_OPTIONS, [(0, "int8", 0)])]
    return write_model(tensors, ops, inputs=[0], outputs=[6])


def _numpy_forward(w1: np.ndarray, x: np.ndarray) -> np.ndarray:
    h = np.maximum(x.astype(np.float64) @ w1.T.astype(np.float64) + B1, 0)
    return h @ W2.T.astype(np.float64) + B2


def _load(tmp_path, data: bytes, name: str = "m.tflite"):
    path = tmp_path / name
    path.write_bytes(data)
    return path, *tt.load_model(path)


def _ours(mod, params):
    vm = relax.VirtualMachine(tvm.compile(PlainTIRCalls(mod), target="llvm"), tvm.cpu())
    weights = [tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]]
    return lambda x: vm["main"](tvm.runtime.tensor(x), *weights).numpy()


def test_float16_weights_behind_a_dequantize_are_folded(tmp_path):
    """The converter's float16 quantization: the weight is stored float16 and a DEQUANTIZE op
    turns it into float32 at run time; here it is folded at import."""
    half = W1.astype(np.float16)
    data = _mlp(Tensor("w1_fp32", (8, 16), FLOAT32), extra=[Tensor("w1_fp16", (8, 16), FLOAT16, half)],
                extra_ops=[Op(DEQUANTIZE, [7], [1])])
    path, mod, params = _load(tmp_path, data)
    assert params["linear0.weight"].dtype == np.float32
    np.testing.assert_array_equal(params["linear0.weight"], half.astype(np.float32))
    ours, (_, ref) = _ours(mod, params), litert_reference(path)
    for x in RNG.normal(0, 1, (10, 1, 16)).astype(np.float32):
        np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours(x), _numpy_forward(half, x), rtol=1e-5, atol=1e-6)


def test_weight_only_int8_per_channel_is_dequantized(tmp_path):
    scales = np.abs(W1).max(axis=1) / 127
    q = np.round(W1 / scales[:, None]).astype(np.int8)
    data = _mlp(Tensor("w1", (8, 16), INT8, q, scale=list(scales), zero=[0] * 8, axis=0))
    path, mod, params = _load(tmp_path, data)
    w = q.astype(np.float64) * scales[:, None]
    np.testing.assert_allclose(params["linear0.weight"], w, rtol=1e-6)
    ours = _ours(mod, params)
    for x in RNG.normal(0, 1, (10, 1, 16)).astype(np.float32):
        np.testing.assert_allclose(ours(x), _numpy_forward(w, x), rtol=1e-5, atol=1e-6)


def test_weight_only_int8_conv_per_output_channel(tmp_path):
    """A conv's OHWI int8 weight with one scale per output channel (quantized dimension 0)."""
    w = RNG.normal(0, 0.5, (4, 3, 3, 2)).astype(np.float32)  # OHWI
    scales = np.abs(w).reshape(4, -1).max(axis=1) / 127
    q = np.round(w / scales[:, None, None, None]).astype(np.int8)
    tensors = [Tensor("x", (1, 6, 6, 2), FLOAT32), Tensor("w", (4, 3, 3, 2), INT8, q, list(scales), [0] * 4),
               Tensor("b", (4,), FLOAT32, np.zeros(4, np.float32)), Tensor("c", (1, 4, 4, 4), FLOAT32),
               Tensor("fw", (3, 64), FLOAT32, RNG.normal(0, 0.1, (3, 64)).astype(np.float32)),
               Tensor("fb", (3,), FLOAT32, np.zeros(3, np.float32)), Tensor("y", (1, 3), FLOAT32)]
    conv = [(0, "int8", 1), (1, "int32", 1), (2, "int32", 1), (3, "int8", 0)]  # VALID, stride 1
    ops = [Op(CONV_2D, [0, 1, 2], [3], CONV_OPTIONS, conv), Op(FULLY_CONNECTED, [3, 4, 5], [6], FC_OPTIONS)]
    path = tmp_path / "conv.tflite"
    path.write_bytes(write_model(tensors, ops, [0], [6]))
    mod, params = tt.load_model(path)
    np.testing.assert_allclose(params["conv0.weight"],
                               (q * scales[:, None, None, None]).transpose(0, 3, 1, 2), rtol=1e-6)
    ours = _ours(mod, params)
    x = RNG.normal(0, 1, (1, 6, 6, 2)).astype(np.float32)
    wf = q.astype(np.float64) * scales[:, None, None, None]
    conv_out = np.zeros((1, 4, 4, 4))
    for i in range(4):
        for j in range(4):
            conv_out[0, i, j] = np.tensordot(wf, x[0, i:i + 3, j:j + 3, :], axes=([1, 2, 3], [0, 1, 2]))
    expected = conv_out.reshape(1, -1) @ tensors[4].data.T.astype(np.float64)
    np.testing.assert_allclose(ours(x), expected, rtol=1e-5, atol=1e-6)


def _refused(tmp_path, data: bytes, match: str):
    path = tmp_path / "bad.tflite"
    path.write_bytes(data)
    with pytest.raises(tt.TinyTrainError, match=match) as err:
        tt.load_model(path)
    assert "\n" not in str(err.value)


def test_int8_weight_without_scales_is_refused_not_read_as_floats(tmp_path):
    q = np.round(W1 * 50).astype(np.int8)
    _refused(tmp_path, _mlp(Tensor("w1", (8, 16), INT8, q)), "int8 with no scale")


@pytest.mark.parametrize("scale, zero, match", [
    (0.0, 0, "finite positive"), (-0.1, 0, "finite positive"), (float("nan"), 0, "finite positive"),
    (0.1, 300, "zero points"),
])
def test_bad_quantization_is_refused(tmp_path, scale, zero, match):
    q = np.round(W1 * 50).astype(np.int8)
    _refused(tmp_path, _mlp(Tensor("w1", (8, 16), INT8, q, [scale], [zero])), match)


def test_per_channel_scales_of_the_wrong_count_are_refused(tmp_path):
    q = np.round(W1 * 50).astype(np.int8)
    _refused(tmp_path, _mlp(Tensor("w1", (8, 16), INT8, q, [0.1] * 5, [0] * 5, axis=0)), "5 scales")


def test_nan_weights_are_refused(tmp_path):
    w = W1.copy()
    w[2, 3] = np.nan
    _refused(tmp_path, _mlp(Tensor("w1", (8, 16), FLOAT32, w)), "tensor w1 holds NaN")


def test_weight_of_the_wrong_shape_is_refused(tmp_path):
    _refused(tmp_path, _mlp(Tensor("w1", (8, 12), FLOAT32, W1[:, :12].copy())), "weight of shape")


def test_weight_bytes_not_matching_the_shape_are_refused(tmp_path):
    _refused(tmp_path, _mlp(Tensor("w1", (8, 16), FLOAT32, W1[:4].copy())), "holds 256 bytes")


@pytest.mark.parametrize("options, match", [
    ([(0, "int8", 1), (1, "int32", 0), (2, "int32", 1)], "stride"),
    ([(0, "int8", 1), (1, "int32", 1), (2, "int32", 1), (4, "int32", -2)], "dilation"),
    ([(0, "int8", 7), (1, "int32", 1), (2, "int32", 1)], "padding code 7"),
])
def test_bad_conv_geometry_is_refused(tmp_path, options, match):
    w = RNG.normal(0, 0.5, (4, 3, 3, 2)).astype(np.float32)
    tensors = [Tensor("x", (1, 6, 6, 2), FLOAT32), Tensor("w", (4, 3, 3, 2), FLOAT32, w),
               Tensor("b", (4,), FLOAT32, np.zeros(4, np.float32)), Tensor("c", (1, 4, 4, 4), FLOAT32)]
    data = write_model(tensors, [Op(CONV_2D, [0, 1, 2], [3], CONV_OPTIONS, options)], [0], [3])
    _refused(tmp_path, data, match)


def test_an_output_shape_the_operator_cannot_compute_is_refused(tmp_path):
    data = write_model(
        [Tensor("x", (1, 16), FLOAT32), Tensor("w1", (8, 16), FLOAT32, W1), Tensor("b1", (8,), FLOAT32, B1),
         Tensor("y", (1, 5), FLOAT32)], [Op(FULLY_CONNECTED, [0, 1, 2], [3], FC_OPTIONS)], [0], [3])
    _refused(tmp_path, data, "records")


def test_a_tensor_index_past_the_graph_is_refused(tmp_path):
    data = write_model(
        [Tensor("x", (1, 16), FLOAT32), Tensor("w1", (8, 16), FLOAT32, W1), Tensor("b1", (8,), FLOAT32, B1),
         Tensor("y", (1, 8), FLOAT32)], [Op(FULLY_CONNECTED, [0, 9, 2], [3], FC_OPTIONS)], [0], [3])
    _refused(tmp_path, data, "names tensor 9")


def test_a_name_of_raw_bytes_stays_one_short_line(tmp_path):
    """A corrupt string length makes a name swallow the file's bytes: messages escape it and cut it."""
    w = W1.copy()
    w[0, 0] = np.inf
    name = "\n\x00weights\r\n" * 400
    _refused(tmp_path, _mlp(Tensor(name, (8, 16), FLOAT32, w)), r"tensor \\n\\x00weights")
    path = tmp_path / "bad.tflite"
    with pytest.raises(tt.TinyTrainError) as err:
        tt.load_model(path)
    assert len(str(err.value)) < 400

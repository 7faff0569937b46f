"""ONNX models checked before use: every bad file is refused with one line naming the node or
tensor (a TinyTrainError, never a raw Python or TVM error), and valid ones still load."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import tvm_tinytrain as tt
from tests.onnx_ops import OP_MODELS, Net, ort_session
from tvm_tinytrain import zoo


def _save(model: onnx.ModelProto, tmp_path, name: str = "m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def refused(model: onnx.ModelProto, tmp_path, cls=tt.ModelFormatError, *words: str) -> str:
    """The one-line message ``load_model`` refuses ``model`` with; it holds each of ``words``."""
    with pytest.raises(cls) as info:
        tt.load_model(_save(model, tmp_path))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def conv_net(**conv_attrs) -> onnx.ModelProto:
    """input (1, 2, 6, 6) → Conv 3x3 (pads 1, then ``conv_attrs``) → Relu → pool → Gemm."""
    n = Net(0)
    x = n.conv("input", 2, 3, pads=[1, 1, 1, 1])
    model = n.model(n.pool_head(n.node("Relu", [x]), 3), check=False)
    for name, value in conv_attrs.items():
        _set_attr(_node(model, "Conv"), name, value)
    return model


def _node(model, op: str):
    return next(n for n in model.graph.node if n.op_type == op)


def _set_attr(node, name: str, value) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute(name, value)])


def _init(model, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


# ---- float models ---------------------------------------------------------------------
@pytest.mark.parametrize("attrs,words", [
    ({"strides": [0, 1]}, ["strides [0, 1]", "(Conv)"]),
    ({"pads": [1, -1, 1, 1]}, ["pads [1, -1, 1, 1]", "(Conv)"]),
    ({"dilations": [0, 0]}, ["dilations", "(Conv)"]),
    ({"group": 0}, ["group", "(Conv)"]),
    ({"group": 2}, ["group 2", "(Conv)"]),
    ({"kernel_shape": [5, 5]}, ["kernel_shape", "(Conv)"]),
    ({"pads": [0, 0, 0, 0], "strides": [1, 1], "dilations": [1, 1], "kernel_shape": [3, 3]}, None),
])
def test_conv_attributes_are_checked(attrs, words, tmp_path):
    model = conv_net(**attrs)
    if words is None:  # in range: loads
        tt.load_model(_save(model, tmp_path))
    else:
        refused(model, tmp_path, tt.ModelFormatError, *words)


def test_kernel_larger_than_input(tmp_path):
    n = Net(0, shape=(1, 2, 2, 2))
    x = n.conv("input", 2, 3)  # 3x3 on 2x2, unpadded
    refused(n.model(n.pool_head(x, 3), check=False), tmp_path, tt.ModelFormatError,
            "larger than its padded 2x2 input")


@pytest.mark.parametrize("attrs,words", [
    ({"kernel_shape": [2, 2], "strides": [0, 2]}, ["strides [0, 2]"]),
    ({"kernel_shape": [2, 2], "pads": [-1, 0, 0, 0]}, ["pads [-1, 0, 0, 0]"]),
    ({"kernel_shape": [2, 2], "pads": [2, 2, 2, 2]}, ["not smaller than the kernel"]),
    ({"kernel_shape": [0, 2]}, ["kernel_shape [0, 2]"]),
    ({"kernel_shape": [9, 9]}, ["window larger"]),
    ({"strides": [2, 2]}, ["no kernel_shape"]),
])
def test_pool_attributes_are_checked(attrs, words, tmp_path):
    n = Net(0)
    x = n.node("MaxPool", [n.conv("input", 2, 3, pads=[1, 1, 1, 1])], **attrs)
    refused(n.model(n.pool_head(x, 3), check=False), tmp_path, tt.ModelFormatError, "MaxPool", *words)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight(value, tmp_path):
    model = conv_net()
    weight = _node(model, "Conv").input[1]
    array = numpy_helper.to_array(_init(model, weight)).copy()
    array[0, 0, 1, 1] = value
    _init(model, weight).CopyFrom(numpy_helper.from_array(array, weight))
    refused(model, tmp_path, tt.ModelFormatError, f"initializer {weight}", "NaN or infinite")


def test_infinite_clip_bound_is_an_open_side(tmp_path):
    n = Net(3)
    x = n.conv("input", 2, 3, pads=[1, 1, 1, 1])
    x = n.node("Clip", [x, n.const(np.float32(0.0)), n.const(np.float32(np.inf))])
    tt.load_model(_save(n.model(n.pool_head(x, 3)), tmp_path))


def test_nan_in_a_constant_node(tmp_path):
    n = Net(0)
    x = n.conv("input", 2, 3, pads=[1, 1, 1, 1])
    n.nodes.append(helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
        np.array([[[[np.nan]], [[0.0]], [[1.0]]]], np.float32))))
    x = n.node("Add", [x, "k"])
    refused(n.model(n.pool_head(x, 3), check=False), tmp_path, tt.ModelFormatError, "constant k", "NaN")


def test_negative_variance(tmp_path):
    model = OP_MODELS["batchnorm_folded"]()
    var = _node(model, "BatchNormalization").input[4]
    _init(model, var).CopyFrom(numpy_helper.from_array(np.full(3, -1.0, np.float32), var))
    refused(model, tmp_path, tt.ModelFormatError, "BatchNormalization", f"variance {var}")


def test_missing_initializer(tmp_path):
    model = conv_net()
    weight = _node(model, "Conv").input[1]
    kept = [t for t in model.graph.initializer if t.name != weight]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    refused(model, tmp_path, tt.ModelFormatError, weight, "no initializer holds", "(Conv)")


def test_reshape_to_an_impossible_shape(tmp_path):
    n = Net(8)
    x = n.node("Reshape", [n.conv("input", 2, 3), n.const(np.array([1, 7, -1], np.int64))])  # 48 values
    x = n.node("Reshape", [x, n.const(np.array([1, -1], np.int64))])
    refused(n.model(n.head(x, 48), check=False), tmp_path, tt.ModelFormatError, "Reshape", "cannot reshape")


def test_two_inferred_dims(tmp_path):
    n = Net(8)
    x = n.node("Reshape", [n.conv("input", 2, 3), n.const(np.array([-1, -1], np.int64))])
    refused(n.model(n.head(x, 48), check=False), tmp_path, tt.ModelFormatError, "more than one dim")


def test_output_computed_by_no_node(tmp_path):
    model = conv_net()
    model.graph.output[0].name = "nowhere"
    refused(model, tmp_path, tt.ModelFormatError, "output nowhere", "computed by no node")


def test_add_of_shapes_that_do_not_broadcast(tmp_path):
    n = Net(5)
    x = n.node("Add", [n.conv("input", 2, 3, pads=[1, 1, 1, 1]), n.const(np.ones((1, 2, 1, 1), np.float32))])
    refused(n.model(n.pool_head(x, 3), check=False), tmp_path, tt.ModelFormatError, "do not broadcast")


def test_gemm_of_the_wrong_width(tmp_path):
    n = Net(0)
    x = n.node("Flatten", [n.node("GlobalAveragePool", [n.conv("input", 2, 3, pads=[1, 1, 1, 1])])])
    refused(n.model(n.head(x, 5), check=False), tmp_path, tt.ModelFormatError, "Gemm", "weight of 5 inputs")


@pytest.mark.parametrize("mutate", ["no inputs", "string strides", "float group", "bad tensor data"])
def test_malformed_fields_name_the_node(mutate, tmp_path):
    model = conv_net()
    conv = _node(model, "Conv")
    if mutate == "no inputs":
        del _node(model, "Relu").input[:]
        where = "Relu"
    elif mutate == "string strides":
        _set_attr(conv, "strides", "two")
        where = "(Conv)"
    elif mutate == "float group":
        _set_attr(conv, "group", [1.5, 2.5])
        where = "(Conv)"
    else:
        _init(model, conv.input[1]).raw_data = b"\x00\x01\x02"  # not a whole float
        where = conv.input[1]
    refused(model, tmp_path, tt.ModelFormatError, where)


def test_image_ops_need_an_image(tmp_path):
    n = Net(0, shape=(1, 72))
    x = n.node("Reshape", ["input", n.const(np.array([1, 2, 6, 6], np.int64))])
    ok = n.model(n.pool_head(n.conv(x, 2, 3, pads=[1, 1, 1, 1]), 3))
    tt.load_model(_save(ok, tmp_path, "ok.onnx"))  # a feature vector reshaped to an image: fine
    n = Net(0, shape=(1, 72))
    refused(n.model(n.pool_head(n.conv("input", 2, 3), 3), check=False), tmp_path,
            tt.ModelStructureError, "NCHW image", "(1, 72)")


def test_fuzzed_attributes_raise_only_tinytrain_errors(tmp_path):
    """Every integer attribute of small_cnn set to 0, -1 or 2^31: loads or is refused cleanly."""
    base = zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=8)
    targets = [(i, a.name) for i, node in enumerate(base.graph.node) for a in node.attribute
               if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
    assert len(targets) >= 8
    for i, name in targets:
        for value in (0, -1, 2 ** 31):
            model = onnx.ModelProto()
            model.CopyFrom(base)
            node = model.graph.node[i]
            old = helper.get_attribute_value(next(a for a in node.attribute if a.name == name))
            _set_attr(node, name, [value] * len(old) if isinstance(old, list) else value)
            try:
                tt.load_model(_save(model, tmp_path))
            except tt.TinyTrainError as err:
                assert "\n" not in str(err)


# ---- ops in the forms exporters write -------------------------------------------------
def _opset_model(opset: int) -> onnx.ModelProto:
    """Constant, Identity of an initializer, Cast, Slice, Squeeze / Unsqueeze, Dropout and
    ReduceMean, each in the form of ``opset`` (attributes or inputs)."""
    n = Net(21)
    x = n.conv("input", 2, 4, pads=[1, 1, 1, 1])
    n.nodes.append(helper.make_node("Identity", [n.const(np.linspace(-1, 1, 24).astype(np.float32))],
                                    ["offset"]))
    ratio = numpy_helper.from_array(np.float32(0.5))
    n.nodes.append(helper.make_node("Constant", [], ["ratio"], value=ratio))
    x = n.node("Dropout", [x] + (["ratio"] if opset >= 12 else []), **({"ratio": 0.5} if opset < 12 else {}))
    x = n.node("Cast", [x], to=onnx.TensorProto.FLOAT)
    if opset >= 18:
        x = n.node("ReduceMean", [x, n.const(np.array([3], np.int64))], keepdims=1)
    else:
        x = n.node("ReduceMean", [x], axes=[3], keepdims=1)                    # (1, 4, 6, 1)
    if opset >= 13:
        x = n.node("Squeeze", [x, n.const(np.array([3], np.int64))])
        x = n.node("Unsqueeze", [x, n.const(np.array([1], np.int64))])
    else:
        x = n.node("Squeeze", [x], axes=[3])
        x = n.node("Unsqueeze", [x], axes=[1])                                   # (1, 1, 4, 6)
    shape = n.node("Shape", [x])
    batch = n.node("Slice", [shape, n.const(np.array([0], np.int64)), n.const(np.array([1], np.int64))])
    flat = n.node("Concat", [batch, n.const(np.array([-1], np.int64))], axis=0)
    x = n.node("Reshape", [x, flat])                                             # (1, 24)
    x = n.node("Add", [x, n.node("Cast", ["offset"], to=onnx.TensorProto.FLOAT)])
    return n.model(n.head(x, 24), opset=opset)


@pytest.mark.parametrize("opset", [11, 12, 13, 17, 18, 21])
def test_opset_forms_match_onnxruntime(opset, tmp_path):
    model = _opset_model(opset)
    path = _save(model, tmp_path)
    mod, params = tt.load_model(path)
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    x = np.random.default_rng(opset).normal(size=(1, 2, 6, 6)).astype(np.float32)
    ours = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(params[p.name])
                                                for p in mod["main"].params[1:]]).numpy()
    ref = ort_session(model).run(None, {"input": x})[0]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_dropout_in_training_mode_is_refused(tmp_path):
    n = Net(0)
    x = n.conv("input", 2, 3, pads=[1, 1, 1, 1])
    x = n.node("Dropout", [x, n.const(np.float32(0.5)), n.const(np.array(True))])
    refused(n.model(n.pool_head(x, 3)), tmp_path, tt.UnsupportedOperatorError, "training_mode", "eval")


def test_batchnorm_in_training_mode_is_refused(tmp_path):
    model = OP_MODELS["batchnorm_folded"]()
    _set_attr(_node(model, "BatchNormalization"), "training_mode", 1)
    refused(model, tmp_path, tt.UnsupportedOperatorError, "training mode", "model.eval()")


def test_concat_of_activations_is_refused_clearly(tmp_path):
    n = Net(0)
    x = n.conv("input", 2, 3, pads=[1, 1, 1, 1])
    x = n.node("Concat", [x, x], axis=1)
    refused(n.model(n.pool_head(x, 6)), tmp_path, tt.UnsupportedOperatorError, "Concat",
            "known at import")


# ---- int8 QDQ models ------------------------------------------------------------------
@pytest.fixture(scope="module")
def qdq_model() -> onnx.ModelProto:
    return zoo.quantize_qdq(zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=8))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def test_qdq_model_loads(qdq_model, tmp_path):
    mod, _ = tt.load_model(_save(qdq_model, tmp_path))
    assert str(mod["main"].params[0].ty.dtype) == "int8"


@pytest.mark.parametrize("scale", [0.0, -0.05, np.nan, np.inf])
@pytest.mark.parametrize("which", ["activation", "weight"])
def test_qdq_bad_scale(qdq_model, scale, which, tmp_path):
    model = _copy(qdq_model)
    op = "QuantizeLinear" if which == "activation" else "DequantizeLinear"
    consts = {t.name for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == op
                and (which == "activation" or (n.input[0] in consts and _init(model, n.input[0]).data_type
                                               == onnx.TensorProto.INT8)))
    name = node.input[1]
    array = numpy_helper.to_array(_init(model, name)).copy()
    array.reshape(-1)[0] = scale
    _init(model, name).CopyFrom(numpy_helper.from_array(array, name))
    refused(model, tmp_path, tt.ModelFormatError, name, "finite")  # NaN / inf: as any initializer


def test_qdq_zero_point_out_of_range(qdq_model, tmp_path):
    model = _copy(qdq_model)
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zero = _init(model, node.input[2])
    assert zero.data_type == onnx.TensorProto.INT8
    zero.ClearField("raw_data")
    zero.int32_data[:] = [300]
    refused(model, tmp_path, tt.ModelFormatError, f"initializer {zero.name}", "300", "int8")


def test_qdq_zero_point_of_another_type(qdq_model, tmp_path):
    model = _copy(qdq_model)
    consts = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts
                and consts[n.input[0]].data_type == onnx.TensorProto.INT8 and len(n.input) > 2)
    zero = consts[node.input[2]]
    zero.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zero).astype(np.uint8), zero.name))
    refused(model, tmp_path, tt.ModelFormatError, f"zero point {zero.name}", "uint8")


def test_qdq_conv_stride_zero(qdq_model, tmp_path):
    model = _copy(qdq_model)
    _set_attr(_node(model, "Conv"), "strides", [0, 0])
    refused(model, tmp_path, tt.ModelFormatError, "strides [0, 0]", "Conv")

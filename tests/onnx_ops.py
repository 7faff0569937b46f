"""Tiny ONNX models, one per supported operator, for gradient and forward tests.

Each model is ``input (1, 2, 6, 6) → conv 3x3 (3 ch) → <the op> → ... → Gemm``
so the op's gradient reaches a trainable conv below it and a classifier above.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = 4


def ort_session(model: onnx.ModelProto | str | Path):
    """The onnxruntime reference every test compares with: CPU, graph optimizations off.

    With optimizations on, onnxruntime fuses a QDQ model's Q/DQ pairs into its own int8
    kernels, which on CPUs without VNNI (e.g. an AVX2-only AMD EPYC) saturate 16-bit
    intermediates and so differ from machine to machine; unoptimized, it runs the graph
    as written (float ops between exact Q/DQ), which our import equals on every CPU.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class Net:
    def __init__(self, seed: int = 0, shape=(1, 2, 6, 6)):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape = shape
        self.x = "input"
        self.count = 0

    def const(self, array, hint="c") -> str:
        self.count += 1
        name = f"{hint}{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, **attrs) -> str:
        self.count += 1
        out = f"{op.lower()}{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n{self.count}", **attrs))
        return out

    def conv(self, x, c_in, c_out, k=3, groups=1, bias=True, **attrs) -> str:
        w = self.rng.normal(0, (2.0 / (c_in // groups * k * k)) ** 0.5, (c_out, c_in // groups, k, k))
        ins = [x, self.const(w.astype(np.float32), "w")]
        if bias:
            ins.append(self.const(self.rng.normal(0, 0.1, c_out).astype(np.float32), "b"))
        return self.node("Conv", ins, group=groups, **attrs)

    def head(self, x, features: int) -> str:
        w = self.rng.normal(0, features ** -0.5, (CLASSES, features)).astype(np.float32)
        b = self.rng.normal(0, 0.1, CLASSES).astype(np.float32)
        return self.node("Gemm", [x, self.const(w, "fc_w"), self.const(b, "fc_b")], transB=1)

    def pool_head(self, x, channels: int) -> str:
        x = self.node("GlobalAveragePool", [x])
        return self.head(self.node("Flatten", [x]), channels)

    def model(self, out: str, opset: int = 17, check: bool = True) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [out], ["logits"]))
        graph = helper.make_graph(
            self.nodes, "op_test",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.shape))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        if check:
            onnx.checker.check_model(model)
        return model


def _stem(n: Net) -> str:
    return n.conv("input", 2, 3, pads=[1, 1, 1, 1])


def conv_variants():
    n = Net(1)
    x = n.conv("input", 2, 4, pads=[1, 0, 1, 2], strides=[2, 1])      # stride + asymmetric pad
    x = n.node("Relu", [x])
    x = n.conv(x, 4, 4, k=3, groups=4, pads=[1, 1, 1, 1])              # depthwise
    x = n.conv(x, 4, 6, k=1, bias=False)                               # pointwise, no bias
    x = n.conv(x, 6, 6, k=3, groups=2, pads=[0, 1, 2, 1])              # grouped
    x = n.conv(x, 6, 12, k=3, groups=6, pads=[1, 1, 1, 1])             # depthwise multiplier 2
    return n.model(n.pool_head(x, 12))


def relu():
    n = Net(2)
    return n.model(n.pool_head(n.node("Relu", [_stem(n)]), 3))


def relu6():
    n = Net(3)
    x = n.node("Clip", [_stem(n), n.const(np.float32(0.0)), n.const(np.float32(0.5))])
    return n.model(n.pool_head(x, 3))


def clip_both_sides():
    n = Net(4)
    x = n.node("Clip", [_stem(n), n.const(np.float32(-0.3)), n.const(np.float32(0.3))])
    return n.model(n.pool_head(x, 3))


def add_residual():
    n = Net(5)
    a = _stem(n)
    b = n.conv(n.node("Relu", [a]), 3, 3, pads=[1, 1, 1, 1])
    x = n.node("Add", [a, b])
    x = n.node("Add", [x, n.const(n.rng.normal(0, 1, (1, 3, 1, 1)).astype(np.float32))])
    return n.model(n.pool_head(x, 3))


def average_pool():
    n = Net(6)
    x = n.node("AveragePool", [_stem(n)], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    x = n.node("AveragePool", [x], kernel_shape=[2, 2], strides=[1, 1], pads=[0, 0, 1, 1],
               count_include_pad=1)
    return n.model(n.pool_head(x, 3))


def max_pool():
    n = Net(7)
    x = n.node("MaxPool", [_stem(n)], kernel_shape=[2, 2], strides=[2, 2])
    return n.model(n.pool_head(x, 3))


def reduce_mean_flatten():
    n = Net(8)
    x = n.node("ReduceMean", [_stem(n)], axes=[2], keepdims=0)  # (1, 3, 6)
    x = n.node("Reshape", [x, n.const(np.array([1, -1], np.int64))])
    return n.model(n.head(x, 18))


def matmul_add():
    n = Net(9)
    x = n.node("Flatten", [n.node("Relu", [_stem(n)])])
    w = n.rng.normal(0, 0.1, (108, 8)).astype(np.float32)
    x = n.node("Add", [n.node("MatMul", [x, n.const(w)]), n.const(np.full(8, 0.1, np.float32))])
    return n.model(n.head(n.node("Relu", [x]), 8))


def softmax_mid():
    n = Net(10)
    x = n.node("Softmax", [_stem(n)], axis=1)
    return n.model(n.pool_head(x, 3))


def pad_then_relu():
    n = Net(11)
    pads = n.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))
    x = n.node("Pad", [_stem(n), pads, n.const(np.float32(0.25))])
    return n.model(n.pool_head(n.node("Relu", [x]), 3))


def pad_into_conv():
    n = Net(12)
    x = n.node("Pad", ["input", n.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    return n.model(n.pool_head(n.conv(x, 2, 3), 3))


def batchnorm_folded():
    n = Net(13)
    x = _stem(n)
    g, b = n.rng.uniform(0.5, 1.5, 3), n.rng.normal(0, 0.2, 3)
    m, v = n.rng.normal(0, 0.2, 3), n.rng.uniform(0.5, 2, 3)
    x = n.node("BatchNormalization", [x] + [n.const(a.astype(np.float32)) for a in (g, b, m, v)])
    return n.model(n.pool_head(n.node("Relu", [x]), 3))


OP_MODELS = {
    f.__name__: f for f in (
        conv_variants, relu, relu6, clip_both_sides, add_residual, average_pool, max_pool,
        reduce_mean_flatten, matmul_add, softmax_mid, pad_then_relu, pad_into_conv,
        batchnorm_folded,
    )
}

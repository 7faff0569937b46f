"""Write a trained float model back as ONNX (opset 17) that onnxruntime runs.

The exporter reads the ``predict`` function (the backbone as imported, NCHW
inside, the file's own layout at the input) and writes one ONNX node per Relax
call, with the trainer's current parameter values as initializers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from .errors import NonFiniteError, TinyTrainError
from .layers import backbone


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _scalar(expr) -> float:
    return float(expr.value)


class _OnnxWriter:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: dict[relax.Expr, str] = {}
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, array: np.ndarray, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ref(self, expr) -> str:
        if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr, "data"):
            return self.const(expr.data.numpy())
        if expr in self.names:
            return self.names[expr]
        raise TinyTrainError(f"export_onnx: value {expr} is not computed by a supported op")

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def call(self, call: relax.Call) -> str:
        op = call.op.name.removeprefix("relax.")
        a = call.attrs
        args = [self.ref(x) for x in call.args if isinstance(getattr(x, "ty", None), relax.TensorType)]
        if op == "nn.conv2d":
            pads = _ints(a.padding)
            return self.node("Conv", args, strides=_ints(a.strides), dilations=_ints(a.dilation),
                             group=int(a.groups), pads=[pads[0], pads[1], pads[2], pads[3]])
        if op in ("add", "subtract", "multiply", "divide", "matmul"):
            return self.node({"add": "Add", "subtract": "Sub", "multiply": "Mul",
                              "divide": "Div", "matmul": "MatMul"}[op], args)
        if op == "nn.relu":
            return self.node("Relu", args)
        if op == "clip":
            lo, hi = (np.float32(_scalar(v)) for v in call.args[1:3])
            return self.node("Clip", [args[0], self.const(lo), self.const(hi)])
        if op == "permute_dims":
            rank = len(call.args[0].ty.shape)
            axes = _ints(a.axes) if a.axes is not None else list(range(rank))[::-1]
            return self.node("Transpose", args, perm=axes)
        if op == "reshape":
            shape = np.asarray(_ints(call.ty.shape), np.int64)
            return self.node("Reshape", [args[0], self.const(shape, "shape")])
        if op == "mean":
            return self.node("ReduceMean", args, axes=_ints(a.axis), keepdims=int(a.keepdims))
        if op in ("nn.avg_pool2d", "nn.max_pool2d"):
            kw = dict(kernel_shape=_ints(a.pool_size), strides=_ints(a.strides),
                      pads=_ints(a.padding))
            if op == "nn.avg_pool2d":
                return self.node("AveragePool", args, count_include_pad=int(a.count_include_pad), **kw)
            return self.node("MaxPool", args, **kw)
        if op == "nn.softmax":
            return self.node("Softmax", args, axis=int(a.axis))
        if op == "nn.pad":
            widths = _ints(a.pad_width)
            pads = np.asarray(widths[0::2] + widths[1::2], np.int64)
            value = np.float32(float(a.pad_value))
            return self.node("Pad", [args[0], self.const(pads, "pads"), self.const(value)])
        if op == "astype":
            return self.node("Cast", args, to=helper.np_dtype_to_tensor_dtype(np.dtype(str(a.dtype))))
        raise TinyTrainError(f"export_onnx: Relax op {call.op.name} has no ONNX writer")


def export_onnx(trainer_or_mod, path: str | Path, params: dict[str, np.ndarray] | None = None) -> Path:
    """Write the model, with its current (fine-tuned) parameters, as an ONNX file.

    ``export_onnx(trainer, "tuned.onnx")`` or ``export_onnx(mod, "tuned.onnx", params)``.
    """
    if isinstance(trainer_or_mod, tvm.IRModule):
        if params is None:
            raise TinyTrainError("export_onnx(mod, path, params): params are needed with a module")
        func, values = backbone(trainer_or_mod), params
    else:
        func, values = trainer_or_mod.predict_function, trainer_or_mod.params()
    bad = [p.name for p in func.params[1:] if p.name in values
           and not np.all(np.isfinite(np.asarray(values[p.name], np.float64)))]
    if bad:
        raise NonFiniteError(f"export_onnx: parameter(s) {', '.join(bad[:5])} hold inf/NaN; the model "
                             "is not written (train with a lower learning rate, or reset the trainer)")
    writer = _OnnxWriter()
    x = func.params[0]
    writer.names[x] = x.name
    for p in func.params[1:]:
        writer.names[p] = p.name
        writer.inits.append(numpy_helper.from_array(np.asarray(values[p.name], np.float32), p.name))
    for block in func.body.blocks:
        for b in block.bindings:
            value = b.value
            if isinstance(value, relax.Call):
                writer.names[b.var] = writer.call(value)
            elif isinstance(value, relax.Var):
                writer.names[b.var] = writer.ref(value)
            else:
                raise TinyTrainError(f"export_onnx: binding {b.var.name} is not an op call")
    out = writer.ref(func.body.body)
    writer.nodes.append(helper.make_node("Identity", [out], ["logits"]))
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(str(x.ty.dtype)))
    graph = helper.make_graph(
        writer.nodes, "tinytrain",
        [helper.make_tensor_value_info(x.name, dtype, _ints(x.ty.shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, _ints(func.ret_ty.shape))],
        writer.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="tvm-tinytrain")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path

"""ONNX (float) → backbone IRModule, through :class:`RelaxEmitter`.

Constant folding the reader does on the way, so the graph has one conv or
linear layer per trainable layer: BatchNormalization after a Conv is folded
into the conv's weight and bias; a zero Pad before a Conv becomes the conv's
padding; MatMul + Add(constant) and Gemm become one linear layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelFormatError, ModelStructureError, UnsupportedOperatorError
from .emitter import RelaxEmitter, Value

SUPPORTED = [
    "Add", "AveragePool", "BatchNormalization", "Clip", "Conv", "Dropout", "Flatten", "Gemm",
    "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Pad", "ReduceMean", "Relu",
    "Reshape", "Softmax",
]


def read_onnx(data: bytes, path: str, float_dtype: str = "float32",
              float_classifier: bool = True, dequantize: bool = False,
              weight_headroom: dict[int, int] | None = None) -> tuple:
    """A float model, or an int8 one in QDQ form (``onnx_qdq``, which ``float_classifier`` is for)."""
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf raises DecodeError and friends
        raise ModelFormatError(
            f"{path}: not a readable ONNX model ({err.__class__.__name__}); "
            "the file may be truncated or of another format"
        )
    if not model.graph.node:
        raise ModelFormatError(f"{path}: the ONNX file holds no graph (truncated or empty)")
    from .onnx_qdq import is_quantized, read_onnx_qdq

    if is_quantized(model) and dequantize:
        raise ModelStructureError(
            f"{path}: dequantize=True reads int8 TFLite files as their float twin; for an ONNX "
            "QDQ model, load the float ONNX model it was quantized from"
        )
    if weight_headroom and not is_quantized(model):
        raise ModelStructureError(f"{path}: weight_headroom re-quantizes int8 weights; this model is float")
    if is_quantized(model):
        return read_onnx_qdq(model, path, float_dtype, float_classifier, weight_headroom)
    return _OnnxReader(model, path, float_dtype).run()


class _OnnxReader:
    def __init__(self, model: onnx.ModelProto, path: str, float_dtype: str):
        self.float_dtype = float_dtype
        self.graph = model.graph
        self.path = path
        self.consts: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in self.graph.initializer
        }
        self.values: dict[str, Value] = {}
        self.consumers: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name] = self.consumers.get(name, 0) + 1
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.folded: set[int] = set()

    # ---- model input -------------------------------------------------------
    def _input(self) -> tuple[str, tuple[int, ...], str]:
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs) or "none"
            raise ModelStructureError(
                f"{self.path}: the model has {len(inputs)} inputs ({names}); "
                "tinytrain trains single-input models"
            )
        inp = inputs[0]
        elem = inp.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise ModelStructureError(
                f"{self.path}: input {inp.name} is {onnx.TensorProto.DataType.Name(elem)}; "
                "float ONNX models take FLOAT inputs"
            )
        shape = []
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif axis == 0:
                shape.append(1)  # a dynamic batch is bound to 1
            else:
                raise ModelStructureError(
                    f"{self.path}: input {inp.name} has a dynamic dimension "
                    f"{dim.dim_param or '?'} at axis {axis}; only the batch may be dynamic. "
                    "Export the model with a fixed input size"
                )
        if len(shape) != 4:
            raise ModelStructureError(
                f"{self.path}: input {inp.name} has rank {len(shape)}; expected an NCHW image"
            )
        return inp.name, tuple(shape), self.float_dtype

    # ---- driver ------------------------------------------------------------
    def run(self):
        name, shape, dtype = self._input()
        self.em = RelaxEmitter(name, shape, dtype, "NCHW", self.float_dtype)
        self.values[name] = self.em.entry
        if len(self.graph.output) != 1:
            raise ModelStructureError(
                f"{self.path}: the model has {len(self.graph.output)} outputs; expected one"
            )
        for index, node in enumerate(self.graph.node):
            if index in self.folded:
                continue
            label = f"{index} ({node.name or node.output[0]})"
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None:
                raise UnsupportedOperatorError("ONNX", node.op_type, label, SUPPORTED)
            self.node, self.label = node, label
            out = handler(node, index)
            if out is not None:
                self.values[node.output[0]] = out
        out = self._value(self.graph.output[0].name)
        return self.em.finish(out)

    # ---- access ------------------------------------------------------------
    def _value(self, name: str) -> Value:
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            return self.em.constant(self.consts[name])
        raise ModelStructureError(f"{self.path}: tensor {name} is used before it is computed")

    def _const(self, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            self._unsupported(f"its {what} ({name}) is computed at run time, not a constant")
        return self.consts[name]

    def _unsupported(self, detail: str):
        raise UnsupportedOperatorError("ONNX", self.node.op_type, self.label, SUPPORTED, detail)

    def _attrs(self, node) -> dict:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def _sole_consumer(self, name: str, op_type: str):
        """The index of the one node reading ``name``, when it is ``op_type``."""
        if self.consumers.get(name, 0) != 1 or name in {o.name for o in self.graph.output}:
            return None
        for index, node in enumerate(self.graph.node):
            if name in node.input:
                return index if node.op_type == op_type else None
        return None

    # ---- operators ---------------------------------------------------------
    def _op_Conv(self, node, index):
        a = self._attrs(node)
        weight = self._const(node.input[1], "weight").astype(np.float64)
        bias = (
            self._const(node.input[2], "bias").astype(np.float64)
            if len(node.input) > 2 and node.input[2] else np.zeros(weight.shape[0])
        )
        if weight.ndim != 4:
            self._unsupported(f"only 2-D convolutions; the weight has rank {weight.ndim}")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self._unsupported("auto_pad; export with explicit pads")
        pads = list(a.get("pads", [0, 0, 0, 0]))
        x_name = node.input[0]
        pad_node = self.producer.get(x_name)
        if pad_node is not None and pad_node.op_type == "Pad" and self._zero_spatial_pad(pad_node):
            extra = self._pad_amounts(pad_node)
            pads = [pads[0] + extra[0], pads[1] + extra[1], pads[2] + extra[2], pads[3] + extra[3]]
            x_name = pad_node.input[0]
        bn = self._sole_consumer(node.output[0], "BatchNormalization")
        if bn is not None:
            weight, bias = self._fold_batchnorm(self.graph.node[bn], weight, bias)
            self.folded.add(bn)
        y = self.em.conv2d(
            self._value(x_name), weight, bias,
            strides=tuple(a.get("strides", [1, 1])),
            padding=(pads[0], pads[1], pads[2], pads[3]),
            dilation=tuple(a.get("dilations", [1, 1])),
            groups=int(a.get("group", 1)),
            source=node.name or node.output[0],
        )
        if bn is not None:
            self.values[self.graph.node[bn].output[0]] = y
        return y

    def _fold_batchnorm(self, bn, weight, bias):
        eps = self._attrs(bn).get("epsilon", 1e-5)
        gamma, beta, mean, var = (self.consts[n].astype(np.float64) for n in bn.input[1:5])
        scale = gamma / np.sqrt(var + eps)
        return weight * scale[:, None, None, None], (bias - mean) * scale + beta

    def _pad_amounts(self, node) -> list[int]:
        pads = self._pad_vector(node)
        rank = len(pads) // 2
        # ONNX order: [x1_begin, x2_begin, ..., x1_end, x2_end, ...]; spatial axes 2, 3
        return [int(pads[2]), int(pads[3]), int(pads[rank + 2]), int(pads[rank + 3])]

    def _pad_vector(self, node) -> np.ndarray:
        if len(node.input) > 1 and node.input[1]:
            return self.consts.get(node.input[1], np.zeros(0, np.int64))
        return np.asarray(self._attrs(node).get("pads", []), np.int64)

    def _zero_spatial_pad(self, node) -> bool:
        pads = self._pad_vector(node)
        mode = self._attrs(node).get("mode", b"constant")
        value = (
            float(self.consts[node.input[2]]) if len(node.input) > 2 and node.input[2] in self.consts
            else float(self._attrs(node).get("value", 0.0))
        )
        return (
            len(pads) == 8 and mode in (b"constant", "constant") and value == 0.0
            and pads[0] == pads[1] == pads[4] == pads[5] == 0
            and self.consumers.get(node.output[0], 0) == 1
        )

    def _op_Pad(self, node, index):
        if self._sole_consumer(node.output[0], "Conv") is not None and self._zero_spatial_pad(node):
            return None  # folded into the conv that reads it
        mode = self._attrs(node).get("mode", b"constant")
        if mode not in (b"constant", "constant"):
            self._unsupported(f"mode {mode!r}; only constant padding")
        pads = self._pad_vector(node)
        rank = len(pads) // 2
        value = float(self.consts[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0.0
        flat = [int(v) for axis in range(rank) for v in (pads[axis], pads[rank + axis])]
        return self.em.pad(self._value(node.input[0]), flat, value)

    def _op_BatchNormalization(self, node, index):
        self._unsupported("only directly after a Conv whose output nothing else reads")

    def _op_Relu(self, node, index):
        return self.em.relu(self._value(node.input[0]))

    def _op_Clip(self, node, index):
        a = self._attrs(node)
        lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
        if len(node.input) > 1 and node.input[1]:
            lo = float(self._const(node.input[1], "min"))
        if len(node.input) > 2 and node.input[2]:
            hi = float(self._const(node.input[2], "max"))
        return self.em.clip(self._value(node.input[0]), lo, hi)

    def _op_Add(self, node, index):
        return self.em.add(self._value(node.input[0]), self._value(node.input[1]))

    def _op_Identity(self, node, index):
        return self._value(node.input[0])

    _op_Dropout = _op_Identity

    def _op_GlobalAveragePool(self, node, index):
        return self.em.mean(self._value(node.input[0]), [2, 3], keepdims=True)

    def _op_ReduceMean(self, node, index):
        a = self._attrs(node)
        axes = a.get("axes")
        if axes is None and len(node.input) > 1:
            axes = self._const(node.input[1], "axes").tolist()
        x = self._value(node.input[0])
        rank = len(self.em.shape(x))
        axes = list(range(rank)) if axes is None else [int(v) % rank for v in axes]
        return self.em.mean(x, axes, keepdims=bool(a.get("keepdims", 1)))

    def _pool_args(self, node):
        a = self._attrs(node)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self._unsupported("auto_pad; export with explicit pads")
        if a.get("ceil_mode", 0):
            self._unsupported("ceil_mode=1")
        kernel = tuple(a["kernel_shape"])
        pads = tuple(a.get("pads", [0, 0, 0, 0]))
        return a, kernel, tuple(a.get("strides", [1, 1])), pads

    def _op_AveragePool(self, node, index):
        a, kernel, strides, pads = self._pool_args(node)
        return self.em.avg_pool(
            self._value(node.input[0]), kernel, strides, pads,
            count_include_pad=bool(a.get("count_include_pad", 0)),
        )

    def _op_MaxPool(self, node, index):
        if len(node.output) > 1 and node.output[1]:
            self._unsupported("the Indices output")
        _, kernel, strides, pads = self._pool_args(node)
        return self.em.max_pool(self._value(node.input[0]), kernel, strides, pads)

    def _op_Flatten(self, node, index):
        x = self._value(node.input[0])
        shape = self.em.shape(x)
        axis = int(self._attrs(node).get("axis", 1)) % len(shape)
        return self.em.reshape(x, (int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))))

    def _op_Reshape(self, node, index):
        x = self._value(node.input[0])
        target = [int(v) for v in self._const(node.input[1], "shape")]
        shape = self.em.shape(x)
        target = [shape[i] if v == 0 else v for i, v in enumerate(target)]
        if -1 in target:
            known = int(np.prod([v for v in target if v != -1]))
            target[target.index(-1)] = int(np.prod(shape)) // known
        return self.em.reshape(x, tuple(target))

    def _op_Softmax(self, node, index):
        x = self._value(node.input[0])
        if node.output[0] == self.graph.output[0].name:
            return x  # a trailing softmax is dropped: training and predict work on logits
        axis = int(self._attrs(node).get("axis", -1)) % len(self.em.shape(x))
        return self.em.softmax(x, axis)

    def _op_Gemm(self, node, index):
        a = self._attrs(node)
        if a.get("transA", 0):
            self._unsupported("transA=1")
        weight = self._const(node.input[1], "weight").astype(np.float64) * a.get("alpha", 1.0)
        if not a.get("transB", 0):
            weight = weight.T
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = np.broadcast_to(
                self._const(node.input[2], "bias").astype(np.float64) * a.get("beta", 1.0),
                (weight.shape[0],),
            )
        return self.em.linear(self._value(node.input[0]), weight, bias, node.name or node.output[0])

    def _op_MatMul(self, node, index):
        weight = self._const(node.input[1], "weight").astype(np.float64).T
        bias = None
        add = self._sole_consumer(node.output[0], "Add")
        if add is not None:
            other = [n for n in self.graph.node[add].input if n != node.output[0]]
            if other and other[0] in self.consts and self.consts[other[0]].size == weight.shape[0]:
                bias = self.consts[other[0]].reshape(-1).astype(np.float64)
                self.folded.add(add)
        y = self.em.linear(self._value(node.input[0]), weight, bias, node.name or node.output[0])
        if bias is not None:
            self.values[self.graph.node[add].output[0]] = y
        return y


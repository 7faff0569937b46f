"""ONNX (float) → backbone IRModule, through :class:`RelaxEmitter`.

The reader walks the graph once, node by node, and on the way

1. checks what it reads: finite weights, strides and dilations ≥ 1, pads ≥ 0, kernels
   that fit, shapes that agree; a bad file is refused with one line naming the node
   or tensor, and whatever a malformed field makes Python raise becomes a
   ModelFormatError naming the node (:meth:`_OnnxReader.read`);
2. evaluates constants and shape arithmetic in numpy (``onnx_fold``): Constant,
   Identity of an initializer, ``Shape → Gather → Unsqueeze → Concat → Reshape``...;
   the same folders give the shape of a Reshape, Flatten, Squeeze or Unsqueeze of
   an activation;
3. folds what training does not need as separate layers, so the graph has one conv
   or linear layer per trainable layer: a BatchNormalization (inference form) after a
   Conv, Gemm or MatMul goes into that layer's weight and bias, any other one becomes
   a fixed per-channel affine; a zero Pad before a Conv becomes the conv's padding;
   MatMul + Add(constant) and Gemm become one linear layer; Dropout is the identity.

Opsets 11–21 as exporters write them: Clip's bounds, Pad's pads, Dropout's ratio and
training mode, Squeeze's / Unsqueeze's (13+) and ReduceMean's (18+) axes as inputs or
attributes. The input may be an image (N, C, H, W) or a feature vector (N, F).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tvm import relax

from ..errors import ModelFormatError, ModelStructureError, TinyTrainError, UnsupportedOperatorError
from .emitter import RelaxEmitter, Value
from .onnx_fold import FOLDERS, SHAPE_READERS, FoldError, opset_version, shape_of

SUPPORTED = sorted({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Conv", "Dropout", "Flatten", "Gemm",
    "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Pad", "ReduceMean", "Relu", "Reshape",
    "Softmax", "Squeeze", "Unsqueeze", *FOLDERS,
})
# what Python raises on a malformed protobuf field somewhere in the walk (tvm's errors are
# RuntimeErrors); read() reports it as a ModelFormatError naming the node
MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError, ZeroDivisionError,
             OverflowError, MemoryError, RuntimeError)
NARROW_INTS = {  # integer types ONNX stores widened in int32_data
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT16: np.int16, onnx.TensorProto.UINT16: np.uint16,
}
REEXPORT = "fix the node or re-export the model"


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
    from .onnx_qdq import QdqOnnxReader, is_quantized

    if is_quantized(model) and dequantize:
        raise ModelStructureError(
            f"{path}: dequantize=True reads int8 TFLite files as their float twin; for an ONNX "
            "QDQ model, load the float ONNX model it was quantized from"
        )
    if weight_headroom and not is_quantized(model):
        raise ModelStructureError(f"{path}: weight_headroom re-quantizes int8 weights; this model is float")
    if is_quantized(model):
        return QdqOnnxReader(model, path, float_dtype, float_classifier, weight_headroom).read()
    return _OnnxReader(model, path, float_dtype).read()


class _OnnxReader:
    def __init__(self, model: onnx.ModelProto, path: str, float_dtype: str):
        self.model = model
        self.float_dtype = float_dtype
        self.graph = model.graph
        self.path = path
        self.consts: dict[str, np.ndarray] = {}
        self.values: dict[str, Value] = {}
        self.consumers: dict[str, int] = {}
        self.producer: dict[str, int] = {}
        self.folded: set[int] = set()
        self.node, self.label, self.where = None, "", "the graph"

    # ---- driver ------------------------------------------------------------
    def read(self):
        """:meth:`run`, with what a malformed file makes Python raise reported as one line."""
        try:
            return self.run()
        except TinyTrainError:
            raise
        except FoldError as err:
            raise ModelFormatError(f"{self.path}: {self.where}: {err}; {REEXPORT}") from err
        except MALFORMED as err:
            text = (str(err).strip().splitlines() or [""])[0][:200]
            raise ModelFormatError(
                f"{self.path}: {self.where} is malformed ({err.__class__.__name__}: {text}); "
                "check the file with onnx.checker.check_model and re-export it"
            ) from err

    def run(self):
        self._prepare()
        name, shape, dtype = self._input()
        self.em = RelaxEmitter(name, shape, dtype, "NCHW", self.float_dtype)
        self.values[name] = self.em.entry
        self._one_output()
        self._walk()
        return self.em.finish(self._output())

    def _walk(self) -> None:
        """Every node not folded, through its :meth:`_handler`; its result kept by output name."""
        for index, node in enumerate(self.graph.node):
            if index in self.folded:
                continue
            self._at(index, node)
            if self._fold(node):
                continue
            out = self._handler(node)(node, index)
            if out is not None:
                self.values[node.output[0]] = out

    def _handler(self, node):
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is None:
            detail = "only where its inputs are known at import" if node.op_type in FOLDERS else ""
            raise UnsupportedOperatorError("ONNX", node.op_type, self.label, SUPPORTED, detail)
        return handler

    def _prepare(self):
        """Initializers (checked), who reads and makes what, and the constants folded up front."""
        self.opset = opset_version(self.model)
        clip_bounds = {n for node in self.graph.node if node.op_type == "Clip" for n in node.input[1:]}
        for t in self.graph.initializer:
            self.where = f"initializer {t.name}"
            self.consts[t.name] = self._initializer(t)
            self._check_finite(t.name, self.consts[t.name], t.name in clip_bounds, "initializer")
        self.clip_bounds = clip_bounds
        for index, node in enumerate(self.graph.node):
            for name in node.input:
                self.consumers[name] = self.consumers.get(name, 0) + 1
            for name in node.output:
                self.producer.setdefault(name, index)
        for index, node in enumerate(self.graph.node):  # constants, before any reader needs them
            self._at(index, node)
            if self._fold(node):
                self.folded.add(index)

    def _at(self, index: int, node) -> None:
        self.node, self.label = node, f"{index} ({node.name or (node.output[0] if node.output else '?')})"
        self.where = f"node {self.label} ({node.op_type})"

    @contextmanager
    def _at_node(self, index: int):
        """Messages name node ``index`` inside the block (not restored when it raises)."""
        saved = self.node, self.label, self.where
        self._at(index, self.graph.node[index])
        yield self.graph.node[index]
        self.node, self.label, self.where = saved

    # ---- model input and output --------------------------------------------
    def _input(self) -> tuple[str, tuple[int, ...], str]:
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs) or "none"
            raise ModelStructureError(
                f"{self.path}: the model has {len(inputs)} inputs ({names}); "
                "tinytrain trains single-input models"
            )
        inp = inputs[0]
        self.where = f"input {inp.name}"
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
        if len(shape) < 2:
            raise ModelStructureError(
                f"{self.path}: input {inp.name} has rank {len(shape)}; expected (batch, features) "
                "or an NCHW image (batch, channels, height, width)"
            )
        return inp.name, tuple(shape), self.float_dtype

    def _one_output(self) -> None:
        if len(self.graph.output) != 1:
            raise ModelStructureError(
                f"{self.path}: the model has {len(self.graph.output)} outputs; expected one"
            )

    def _output(self) -> Value:
        self.where = "the graph's output"
        name = self.graph.output[0].name
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            raise ModelStructureError(
                f"{self.path}: the output {name} is a constant: it does not depend on the input"
            )
        raise ModelFormatError(
            f"{self.path}: the output {name} is computed by no node; the file is incomplete, re-export it"
        )

    # ---- checks on tensors --------------------------------------------------
    def _initializer(self, t: onnx.TensorProto) -> np.ndarray:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelFormatError(
                f"{self.path}: initializer {t.name} is stored outside the file (external data); "
                "save the model with its weights inside (onnx.save(..., save_as_external_data=False))"
            )
        narrow = NARROW_INTS.get(t.data_type)
        if narrow is not None and len(t.int32_data):
            info, data = np.iinfo(narrow), np.asarray(t.int32_data, np.int64)
            bad = data[(data < info.min) | (data > info.max)]
            if bad.size:
                raise ModelFormatError(
                    f"{self.path}: initializer {t.name} holds {int(bad[0])}, outside the range of "
                    f"{np.dtype(narrow).name} ({info.min}..{info.max}); re-export or re-quantize the model"
                )
        return numpy_helper.to_array(t)

    def _check_finite(self, name: str, array: np.ndarray, inf_ok: bool, what: str) -> None:
        """NaN never; ±inf only as a Clip bound (an open side)."""
        if not np.issubdtype(array.dtype, np.floating):
            return
        bad = np.isnan(array) if inf_ok else ~np.isfinite(array)
        if bad.any():
            raise ModelFormatError(
                f"{self.path}: {what} {name} holds {int(bad.sum())} NaN or infinite value(s); the "
                "weights are broken (a diverged training run or a bad export): export from finite ones"
            )

    def _format_error(self, detail: str):
        raise ModelFormatError(f"{self.path}: {self.where}: {detail}; {REEXPORT}")

    def _ints(self, attrs: dict, key: str, default, length: int, minimum: int) -> list[int]:
        """An integer list attribute, checked: ``length`` values, each ≥ ``minimum``."""
        values = attrs.get(key, default)
        if values is None:
            self._format_error(f"it has no {key}")
        values = [int(v) for v in np.asarray(values).reshape(-1)]
        if len(values) != length or any(not minimum <= v < 2 ** 31 for v in values):
            count = "an integer" if length == 1 else f"{length} integers"
            self._format_error(f"{key} {values}: expected {count} ≥ {minimum}")
        return values

    # ---- constant folding ---------------------------------------------------
    def _known_shape(self, name: str) -> tuple[int, ...] | None:
        value = self.values.get(name)
        if value is None:
            return None
        return RelaxEmitter.shape(value if isinstance(value, relax.Expr) else value.var)

    def _fold(self, node) -> bool:
        """Evaluate ``node`` in numpy when all it reads is known (``onnx_fold``); False when not."""
        fold = FOLDERS.get(node.op_type)
        if fold is None:
            return False
        inputs = []
        for i, name in enumerate(node.input):
            if not name:
                inputs.append(None)
            elif name in self.consts:
                inputs.append(self.consts[name])
            elif i == 0 and node.op_type in SHAPE_READERS and self._known_shape(name) is not None:
                inputs.append(shape_of(self._known_shape(name)))
            else:
                return False
        outputs = fold(node, inputs, self._attrs(node), self.opset)
        for name, array in zip(node.output, outputs):
            if name:
                self.consts[name] = np.asarray(array)
                if node.op_type == "Constant":
                    self._check_finite(name, self.consts[name], name in self.clip_bounds, "constant")
        return True

    # ---- access ------------------------------------------------------------
    def _value(self, name: str) -> Value:
        if name in self.values:
            return self.values[name]
        if name in self.consts:
            return self.em.constant(self.consts[name])
        self._missing(name)

    def _missing(self, name: str):
        if name in self.producer:
            self._format_error(f"it reads {name} before node {self.producer[name]} computes it "
                               "(the nodes are not in topological order)")
        self._format_error(f"it reads {name or 'an unnamed input'}, which no node computes and no "
                           "initializer holds (the file is incomplete)")

    def _const(self, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            if name in self.values or name in self.producer:
                self._unsupported(f"its {what} ({name}) is computed at run time, not a constant")
            self._missing(name)
        return self.consts[name]

    def _input_name(self, node, i: int, what: str) -> str:
        if len(node.input) <= i or not node.input[i]:
            self._format_error(f"it has no {what} (input {i})")
        return node.input[i]

    def _unsupported(self, detail: str):
        raise UnsupportedOperatorError("ONNX", self.node.op_type, self.label, SUPPORTED, detail)

    def _attrs(self, node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def _image(self, x: Value) -> tuple[int, ...]:
        shape = self.em.shape(x)
        if len(shape) != 4:
            raise ModelStructureError(
                f"{self.path}: {self.where} takes an NCHW image; its input has shape {shape}"
            )
        return shape

    def _sole_consumer(self, name: str, op_type: str):
        """The index of the one node reading ``name``, when it is ``op_type``."""
        if self.consumers.get(name, 0) != 1 or name in {o.name for o in self.graph.output}:
            return None
        for index, node in enumerate(self.graph.node):
            if name in node.input:
                return index if node.op_type == op_type else None
        return None

    # ---- BatchNormalization -------------------------------------------------
    def _bn_affine(self, bn, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Inference BatchNormalization as ``y = x·scale + shift`` per channel."""
        a = self._attrs(bn)
        if a.get("training_mode", 0) or any(self.consumers.get(o) for o in bn.output[1:] if o):
            self._unsupported("training mode (running statistics updated); export the model "
                              "in eval mode (model.eval())")
        stats = [self._const(self._input_name(bn, i, what), what).astype(np.float64).reshape(-1)
                 for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance"))]
        if any(s.size != channels for s in stats):
            self._format_error(f"parameters of sizes {[s.size for s in stats]} for {channels} channels")
        gamma, beta, mean, var = stats
        var = var + float(a.get("epsilon", 1e-5))
        if np.any(var <= 0):
            self._format_error(f"variance {bn.input[4]} + epsilon is not positive")
        scale = gamma / np.sqrt(var)
        return scale, beta - mean * scale

    def _fold_following_bn(self, out_name: str, weight: np.ndarray, bias: np.ndarray | None):
        """A BatchNormalization that alone reads a conv / linear output, folded into its weight
        and bias; returns (weight, bias, the BN node or None)."""
        index = self._sole_consumer(out_name, "BatchNormalization")
        if index is None or self.graph.node[index].input[0] != out_name:
            return weight, bias, None
        with self._at_node(index) as bn:
            scale, shift = self._bn_affine(bn, weight.shape[0])
        bias = np.zeros(weight.shape[0]) if bias is None else bias
        self.folded.add(index)
        return weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), bias * scale + shift, bn

    def _op_BatchNormalization(self, node, index):
        """One not after a conv or linear layer: a fixed per-channel affine (nothing to train)."""
        x = self._value(node.input[0])
        shape = self.em.shape(x)
        if len(shape) < 2:
            self._format_error(f"an input of shape {shape}; BatchNormalization needs a channel axis")
        scale, shift = self._bn_affine(node, shape[1])
        column = (1, shape[1]) + (1,) * (len(shape) - 2)
        y = self.em.multiply(x, self.em.constant(scale.reshape(column)))
        return self.em.add(y, self.em.constant(shift.reshape(column)))

    # ---- conv and pad ------------------------------------------------------
    def _op_Conv(self, node, index):
        a = self._attrs(node)
        weight = self._const(self._input_name(node, 1, "weight"), "weight").astype(np.float64)
        if weight.ndim != 4:
            self._unsupported(f"only 2-D convolutions; the weight has rank {weight.ndim}")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self._unsupported("auto_pad; export with explicit pads")
        c_out, c_group, kh, kw = weight.shape
        bias = np.zeros(c_out)
        if len(node.input) > 2 and node.input[2]:
            bias = self._const(node.input[2], "bias").astype(np.float64)
            if bias.shape != (c_out,):
                self._format_error(f"bias {node.input[2]} of shape {bias.shape} for {c_out} output channels")
        strides = self._ints(a, "strides", [1, 1], 2, 1)
        dilation = self._ints(a, "dilations", [1, 1], 2, 1)
        pads = self._ints(a, "pads", [0, 0, 0, 0], 4, 0)
        groups = self._ints(a, "group", [1], 1, 1)[0]
        if list(a.get("kernel_shape", [kh, kw])) != [kh, kw]:
            self._format_error(f"kernel_shape {list(a['kernel_shape'])} but a weight of shape {weight.shape}")
        x_name = node.input[0]
        pad_index = self.producer.get(x_name)
        if pad_index is not None and self.graph.node[pad_index].op_type == "Pad":
            with self._at_node(pad_index) as pad_node:
                zero_pad = self._zero_spatial_pad(pad_node)
                extra = self._pad_amounts(pad_node) if zero_pad else None
            if extra is not None:
                pads = [p + e for p, e in zip(pads, extra)]
                x_name = pad_node.input[0]
        x = self._value(x_name)
        shape = self._image(x)
        if shape[1] != c_group * groups or c_out % groups:
            self._format_error(f"weight {node.input[1]} of shape {weight.shape} with group {groups} "
                               f"does not fit an input of {shape[1]} channels")
        for size, k, d, p0, p1 in ((shape[2], kh, dilation[0], pads[0], pads[2]),
                                   (shape[3], kw, dilation[1], pads[1], pads[3])):
            if size + p0 + p1 < d * (k - 1) + 1:
                self._format_error(f"a {kh}x{kw} kernel (dilation {dilation}) larger than its padded "
                                   f"{shape[2]}x{shape[3]} input")
        weight, bias, bn = self._fold_following_bn(node.output[0], weight, bias)
        y = self.em.conv2d(
            x, weight, bias, strides=tuple(strides), padding=tuple(pads), dilation=tuple(dilation),
            groups=groups, source=node.name or node.output[0],
        )
        if bn is not None:
            self.values[bn.output[0]] = y
        return y

    def _pad_amounts(self, node) -> list[int]:
        pads = self._pad_vector(node)
        rank = len(pads) // 2
        # ONNX order: [x1_begin, x2_begin, ..., x1_end, x2_end, ...]; spatial axes 2, 3
        return [int(pads[2]), int(pads[3]), int(pads[rank + 2]), int(pads[rank + 3])]

    def _pad_vector(self, node) -> np.ndarray:
        """Pad's pads (input from opset 11, attribute before), checked: ≥ 0, two per axis."""
        if self.opset >= 11:
            if len(node.input) > 3 and node.input[3]:
                self._unsupported("the axes input; pad every axis")
            pads = self._const(self._input_name(node, 1, "pads"), "pads")
        else:
            pads = self._attrs(node).get("pads", [])
        pads = np.asarray(pads, np.int64).reshape(-1)
        rank = self._known_shape(node.input[0])
        rank = len(rank) if rank is not None else len(pads) // 2
        if len(pads) != 2 * rank:
            self._format_error(f"{len(pads)} pads for an input of rank {rank}; expected {2 * rank}")
        if np.any(pads < 0):
            self._unsupported(f"negative pads {pads.tolist()} (a crop)")
        return pads

    def _pad_value(self, node) -> float:
        if self.opset >= 11:
            if len(node.input) > 2 and node.input[2]:
                return float(np.asarray(self._const(node.input[2], "constant value")).reshape(-1)[0])
            return 0.0
        return float(self._attrs(node).get("value", 0.0))

    def _pad_mode(self, node):
        mode = self._attrs(node).get("mode", b"constant")
        if mode not in (b"constant", "constant"):
            self._unsupported(f"mode {mode!r}; only constant padding")

    def _zero_spatial_pad(self, node) -> bool:
        self._pad_mode(node)
        pads = self._pad_vector(node)
        return (
            len(pads) == 8 and self._pad_value(node) == 0.0
            and pads[0] == pads[1] == pads[4] == pads[5] == 0
            and self.consumers.get(node.output[0], 0) == 1
        )

    def _op_Pad(self, node, index):
        if self._sole_consumer(node.output[0], "Conv") is not None and self._zero_spatial_pad(node):
            return None  # folded into the conv that reads it
        self._pad_mode(node)
        pads = self._pad_vector(node)
        rank = len(pads) // 2
        flat = [int(v) for axis in range(rank) for v in (pads[axis], pads[rank + axis])]
        return self.em.pad(self._value(node.input[0]), flat, self._pad_value(node))

    # ---- elementwise -------------------------------------------------------
    def _op_Relu(self, node, index):
        return self.em.relu(self._value(node.input[0]))

    def _op_Clip(self, node, index):
        a = self._attrs(node)
        lo, hi = a.get("min", -np.inf), a.get("max", np.inf)
        if len(node.input) > 1 and node.input[1]:
            lo = float(np.asarray(self._const(node.input[1], "min")).reshape(-1)[0])
        if len(node.input) > 2 and node.input[2]:
            hi = float(np.asarray(self._const(node.input[2], "max")).reshape(-1)[0])
        return self.em.clip(self._value(node.input[0]), lo, hi)

    def _op_Add(self, node, index):
        a, b = self._value(node.input[0]), self._value(self._input_name(node, 1, "second operand"))
        try:
            np.broadcast_shapes(self.em.shape(a), self.em.shape(b))
        except ValueError:
            self._format_error(f"operands of shapes {self.em.shape(a)} and {self.em.shape(b)} "
                               "do not broadcast")
        return self.em.add(a, b)

    def _op_Identity(self, node, index):
        return self._value(node.input[0])

    def _op_Dropout(self, node, index):
        """Inference Dropout: the identity. Its ratio (an input from opset 12) does not matter."""
        if len(node.output) > 1 and self.consumers.get(node.output[1]):
            self._unsupported("its mask output is read; export the model in eval mode")
        if len(node.input) > 2 and node.input[2]:
            if np.asarray(self._const(node.input[2], "training_mode")).reshape(-1).any():
                self._unsupported("training_mode true; export the model in eval mode (model.eval())")
        return self._value(node.input[0])

    def _op_Cast(self, node, index):
        to = helper.tensor_dtype_to_np_dtype(int(self._attrs(node)["to"]))
        if not np.issubdtype(to, np.floating):
            self._unsupported(f"a cast of an activation to {to}; the graph computes in float")
        return self._value(node.input[0])  # computed in the graph's float type

    def _op_Softmax(self, node, index):
        x = self._value(node.input[0])
        if node.output[0] == self.graph.output[0].name:
            return x  # a trailing softmax is dropped: training and predict work on logits
        rank = len(self.em.shape(x))
        axis = int(self._attrs(node).get("axis", -1 if self.opset >= 13 else 1)) % rank
        if self.opset < 13 and axis != rank - 1:
            self._unsupported(f"a softmax over axes {axis}..{rank - 1} together (before opset 13); "
                              "export with opset 13 or later")
        return self.em.softmax(x, axis)

    # ---- pools and means ---------------------------------------------------
    def _op_GlobalAveragePool(self, node, index):
        x = self._value(node.input[0])
        self._image(x)
        return self.em.mean(x, [2, 3], keepdims=True)

    def _axes_input(self, node, since: int) -> list[int] | None:
        """``axes``: an attribute before opset ``since``, an optional constant input from then on."""
        if self.opset < since or len(node.input) < 2 or not node.input[1]:
            axes = self._attrs(node).get("axes")
            return None if axes is None else [int(v) for v in axes]
        return [int(v) for v in np.asarray(self._const(node.input[1], "axes")).reshape(-1)]

    def _op_ReduceMean(self, node, index):
        a = self._attrs(node)
        x = self._value(node.input[0])
        rank = len(self.em.shape(x))
        axes = self._axes_input(node, 18)
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(rank))
        if any(not -rank <= v < rank for v in axes):
            self._format_error(f"axes {axes} for an input of rank {rank}")
        return self.em.mean(x, sorted({v % rank for v in axes}), keepdims=bool(a.get("keepdims", 1)))

    def _pool_args(self, node):
        a = self._attrs(node)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self._unsupported("auto_pad; export with explicit pads")
        if a.get("ceil_mode", 0):
            self._unsupported("ceil_mode=1")
        kernel = self._ints(a, "kernel_shape", None, 2, 1)
        strides = self._ints(a, "strides", [1, 1], 2, 1)
        pads = self._ints(a, "pads", [0, 0, 0, 0], 4, 0)
        if self._ints(a, "dilations", [1, 1], 2, 1) != [1, 1]:
            self._unsupported(f"dilations {list(a['dilations'])}; only 1")
        if any(p >= kernel[i % 2] for i, p in enumerate(pads)):
            self._format_error(f"pads {pads} not smaller than the kernel {kernel}")
        shape = self._known_shape(node.input[0])
        if shape is not None and len(shape) == 4 and any(
                shape[2 + i] + pads[i] + pads[i + 2] < kernel[i] for i in (0, 1)):
            self._format_error(f"a {kernel[0]}x{kernel[1]} window larger than its padded "
                               f"{shape[2]}x{shape[3]} input")
        return a, tuple(kernel), tuple(strides), tuple(pads)

    def _op_AveragePool(self, node, index):
        x = self._value(node.input[0])
        self._image(x)
        a, kernel, strides, pads = self._pool_args(node)
        include = bool(a.get("count_include_pad", 0))
        return self.em.avg_pool(x, kernel, strides, pads, count_include_pad=include)

    def _op_MaxPool(self, node, index):
        if len(node.output) > 1 and node.output[1]:
            self._unsupported("the Indices output")
        x = self._value(node.input[0])
        self._image(x)
        _, kernel, strides, pads = self._pool_args(node)
        return self.em.max_pool(x, kernel, strides, pads)

    # ---- shapes ------------------------------------------------------------
    def _reshaped(self, node, index):
        """Reshape / Flatten / Squeeze / Unsqueeze of an activation: the folder, run on a
        stand-in of the activation's shape, gives the new shape."""
        x = self._value(node.input[0])
        inputs = [shape_of(self.em.shape(x))]
        what = "shape" if node.op_type == "Reshape" else "axes"
        inputs += [self._const(name, what) if name else None for name in node.input[1:]]
        shape = FOLDERS[node.op_type](node, inputs, self._attrs(node), self.opset)[0].shape
        return self.em.reshape(x, tuple(int(d) for d in shape))

    _op_Reshape = _op_Flatten = _op_Squeeze = _op_Unsqueeze = _reshaped

    # ---- linear layers -----------------------------------------------------
    def _features(self, x: Value, weight: np.ndarray) -> tuple[int, ...]:
        shape = self.em.shape(x)
        if shape[-1] != weight.shape[1]:
            self._format_error(f"an input of shape {shape} for a weight of {weight.shape[1]} inputs")
        return shape

    def _op_Gemm(self, node, index):
        a = self._attrs(node)
        if a.get("transA", 0):
            self._unsupported("transA=1")
        weight = self._const(self._input_name(node, 1, "weight"), "weight").astype(np.float64)
        if weight.ndim != 2:
            self._format_error(f"a weight of shape {weight.shape}; Gemm takes a matrix")
        weight = weight * a.get("alpha", 1.0)
        if not a.get("transB", 0):
            weight = weight.T
        x = self._value(node.input[0])
        if len(self._features(x, weight)) != 2:
            self._format_error(f"an input of shape {self.em.shape(x)}; Gemm takes (batch, features)")
        bias = None
        if len(node.input) > 2 and node.input[2]:
            b = self._const(node.input[2], "bias").astype(np.float64) * a.get("beta", 1.0)
            try:
                bias = np.broadcast_to(b, (1, weight.shape[0])).reshape(-1)
            except ValueError:
                self._format_error(f"bias {node.input[2]} of shape {b.shape} for {weight.shape[0]} outputs")
        weight, bias, bn = self._fold_following_bn(node.output[0], weight, bias)
        y = self.em.linear(x, weight, bias, node.name or node.output[0])
        if bn is not None:
            self.values[bn.output[0]] = y
        return y

    def _op_MatMul(self, node, index):
        weight = self._const(self._input_name(node, 1, "weight"), "weight").astype(np.float64)
        if weight.ndim != 2:
            self._unsupported(f"a weight of shape {weight.shape}; only a constant matrix")
        weight = weight.T
        x = self._value(node.input[0])
        rank = len(self._features(x, weight))
        bias, out = None, node.output[0]
        add = self._sole_consumer(out, "Add")
        if add is not None:
            other = [n for n in self.graph.node[add].input if n != out]
            if other and other[0] in self.consts and self.consts[other[0]].size == weight.shape[0]:
                bias = self.consts[other[0]].reshape(-1).astype(np.float64)
                self.folded.add(add)
                out = self.graph.node[add].output[0]
        bn = None
        if rank == 2:  # BatchNormalization's channels are the features only for (batch, features)
            weight, bias, bn = self._fold_following_bn(out, weight, bias)
        y = self.em.linear(x, weight, bias, node.name or node.output[0])
        self.values[out] = y
        if bn is not None:
            self.values[bn.output[0]] = y
        return y

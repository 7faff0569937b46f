"""int8 ONNX in QDQ form → a true integer backbone, the same graph as an int8 TFLite model.

The QDQ form (``onnxruntime.quantization.quantize_static(quant_format=QuantFormat.QDQ)``)
keeps float ops and wraps them in QuantizeLinear / DequantizeLinear pairs::

    x_q ─DQ(s_x, z_x)→ Conv(·, DQ(w_q, s_w), DQ(b_q, s_x·s_w)) ─[Relu | Clip]→ Q(s_y, z_y) → y_q

The reader reads each such unit as one integer op of ``relay_passes.int8_ops``:
Conv → ``qconv2d``, Gemm / MatMul (+ Add of a constant bias) → ``qlinear``, Add of
two activations → ``qadd``, AveragePool / GlobalAveragePool → ``qavg_pool``, with a
Relu or Clip between the op and its QuantizeLinear fused into the output clamp.
Flatten / Reshape / Identity / Dropout pass the int8 value through; a trailing
Softmax is dropped (training works on logits).

Weights must be int8 with zero point 0 (symmetric, per-channel or per-tensor);
activations int8 (``QuantType.QInt8``) with one scale and zero point per tensor.
A float bias is quantized with ``s_x·s_w`` as onnxruntime does. The model's input
stays float in the file, but the imported ``main`` takes int8: the first
QuantizeLinear's (scale, zero point) become the model's input quantization, and
``tvm_tinytrain.quantize_input`` converts float data. The output is the float
logits: the last int8 layer dequantized or, with ``float_classifier``, a float32
fully connected layer on the dequantized features (its weights and bias
dequantized from the file).

ONNX requantizes with a float multiplier; the kernels compute TFLite's fixed-point
arithmetic, with each conv's multiplier written so that it rounds once
(:func:`single_rounding`), which makes them agree with onnxruntime up to the rare
value that lies within ~1e-5 of a rounding tie (where onnxruntime's float32 is the
one that is off). Two structures have no TFLite counterpart and are read as:
a pooling whose output is quantized differently from its input → a depthwise
qconv with constant all-one weights and scale ``1/window`` (the mean, requantized;
no trainable layer added); MatMul → Q → DQ → Add(int8 bias) → Q → one qlinear
with the bias at ``s_x·s_w``, skipping the intermediate rounding (within one step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from tvm import relax

from relay_passes import int8_ops
from relay_passes.int8_ops import QAddParams, QConvParams, QPoolParams

from ..errors import ModelStructureError, UnsupportedOperatorError
from .emitter import RelaxEmitter, Value
from .onnx_fold import FOLDERS
from .onnx_reader import _OnnxReader

SUPPORTED = sorted({
    "Add", "AveragePool", "Clip", "Conv", "DequantizeLinear", "Dropout", "Flatten", "Gemm",
    "GlobalAveragePool", "Identity", "MatMul", "QuantizeLinear", "Relu", "Reshape", "Softmax",
    "Squeeze", "Unsqueeze", *FOLDERS,
})
QOPERATOR = {  # onnxruntime's other quantized format: integer ops instead of Q/DQ pairs
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid",
    "QLinearSoftmax", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
}
QDQ_MARKERS = {"QuantizeLinear", "DequantizeLinear"} | QOPERATOR
REDO = "quantize the float model with onnxruntime.quantization.quantize_static " \
       "(QuantFormat.QDQ, QuantType.QInt8 activations and weights), e.g. tvm_tinytrain.zoo.quantize_qdq"
HINTS = {
    "BatchNormalization": "fold BatchNormalization into the Conv before quantizing "
                          "(onnxruntime.quantization.quant_pre_process does; so does zoo.quantize_qdq)",
    "MaxPool": "there is no int8 max pool kernel; import the float model instead",
    "Pad": "fold a zero Pad into the following Conv's pads before quantizing",
    "ReduceMean": "use GlobalAveragePool for the spatial mean",
}


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds quantized ops (QDQ pairs or onnxruntime's QOperator ops)."""
    return any(node.op_type in QDQ_MARKERS for node in model.graph.node)


def read_onnx_qdq(model: onnx.ModelProto, path: str, float_dtype: str = "float32",
                  float_classifier: bool = True, weight_headroom: dict[int, int] | None = None) -> tuple:
    return QdqOnnxReader(model, path, float_dtype, float_classifier, weight_headroom).run()


@dataclass(frozen=True)
class QValue:
    """A float tensor of the file that is an int8 value of the graph: ``(var − zero)·scale``."""

    var: Value
    scale: float
    zero: int

    @property
    def quant(self) -> tuple[float, int]:
        return self.scale, self.zero


@dataclass(frozen=True)
class QConst:
    """A DequantizeLinear of an initializer: integer data, scales, zero points, axis."""

    data: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    axis: int


def single_rounding(q: QConvParams) -> QConvParams:
    """``q`` with each requantization multiplier written so that the conv kernel rounds once.

    TFLite's MultiplyByQuantizedMultiplier with a multiplier ``M < 1`` (shift < 0)
    rounds ``acc·mult / 2^31`` to an integer, then divides that by ``2^−shift``, rounding
    again: off by one from ``round(acc·M)`` for a fraction ~``M`` of the values (0.1 to
    0.5 % per layer in MobileNetV2), an error onnxruntime's float requantization does
    not make and that grows through a deep network (to 19 steps in MobileNetV2's logits).
    Written as ``mult = round(M·2^31)``, shift 0, the same kernel rounds once
    (``M ≥ 2^−12``: at least 19 bits of multiplier, an error below 2^−13 of a step);
    smaller multipliers keep TFLite's form, whose second rounding is then as small.
    Same kernel, same parameters (the gradient reads the scales, not ``mult``).
    """
    mult, shift = list(q.mult), list(q.shift)
    sx, sy = np.float64(np.float32(q.sx)), np.float64(np.float32(q.sy))
    for c, sw in enumerate(q.sw):
        real = float(sx * np.float32(sw) / sy)  # as QConvParams derives it
        scaled = round(real * (1 << 31))
        if 2.0 ** -12 <= real and scaled < (1 << 31):
            mult[c], shift[c] = scaled, 0
    return replace(q, mult=tuple(mult), shift=tuple(shift))


def _same(a: tuple[float, int], b: tuple[float, int]) -> bool:
    return np.float32(a[0]) == np.float32(b[0]) and int(a[1]) == int(b[1])


class QdqOnnxReader(_OnnxReader):
    def __init__(self, model: onnx.ModelProto, path: str, float_dtype: str, float_classifier: bool,
                 weight_headroom: dict[int, int] | None = None):
        super().__init__(model, path, float_dtype)
        self.float_classifier = float_classifier
        self.weight_headroom = weight_headroom
        self.readers: dict[str, list[int]] = {}
        self.qconsts: dict[str, QConst] = {}  # DequantizeLinear output → its constant

    # ---- driver ------------------------------------------------------------
    def _prepare(self):
        super()._prepare()  # initializers checked, constants folded
        for index, node in enumerate(self.graph.node):
            for name in node.input:
                if name and index not in self.readers.setdefault(name, []):
                    self.readers[name].append(index)
        self.output_name = self.graph.output[0].name if self.graph.output else ""
        for index, node in enumerate(self.graph.node):
            if node.op_type == "DequantizeLinear" and node.input and node.input[0] in self.consts:
                self._at(index, node)
                self.qconsts[node.output[0]] = self._qconst(node)
                self.folded.add(index)

    def run(self):
        self._prepare()
        name, shape, _ = self._input()
        self._one_output()
        self.input_name = name
        self.em = RelaxEmitter(name, shape, "int8", "NCHW", self.float_dtype, "ONNX", self.weight_headroom)
        self._walk()
        if self.em.input_quant is None:
            raise ModelStructureError(
                f"{self.path}: the model's input {name} is never quantized (no QuantizeLinear "
                f"reads it); {REDO}"
            )
        out = self._output()
        if isinstance(out, QValue):
            out = self.em.dequantize(out.var, out.scale, out.zero)
        return self.em.finish(out)

    def _handler(self, node):
        if node.op_type in QOPERATOR:
            self._unsupported(f"onnxruntime's QOperator format; {REDO}")
        handler = getattr(self, f"_q_{node.op_type}", None)
        if handler is None:
            self._unsupported(HINTS.get(node.op_type, "no int8 kernel for it"))
        return handler

    def _unsupported(self, detail: str):
        raise UnsupportedOperatorError("ONNX QDQ", self.node.op_type, self.label, SUPPORTED, detail)

    # ---- graph structure ---------------------------------------------------
    def _sole_reader(self, name: str):
        """(index, node) of the one node reading ``name``, or None (none, several, or the output)."""
        readers = self.readers.get(name, [])
        if len(readers) != 1 or name == self.output_name:
            return None
        return readers[0], self.graph.node[readers[0]]

    def _chain_to_output(self, name: str) -> list[int] | None:
        """The Q / DQ / Identity / trailing Softmax nodes between ``name`` and the model's
        output, when nothing else reads any of them; None when ``name`` does not lead there."""
        chain: list[int] = []
        while name != self.output_name:
            reader = self._sole_reader(name)
            if reader is None or reader[1].op_type not in (
                    "QuantizeLinear", "DequantizeLinear", "Softmax", "Identity", "Dropout"):
                return None
            chain.append(reader[0])
            name = reader[1].output[0]
        return chain

    # ---- quantization parameters -------------------------------------------
    def _qconst(self, node) -> QConst:
        for i, what in ((1, "scale"), (2, "zero point")):
            if len(node.input) > i and node.input[i] and node.input[i] not in self.consts:
                self._unsupported(f"its {what} is computed at run time, not a constant")
        a = self._attrs(node)
        if a.get("block_size", 0):
            self._unsupported("blocked quantization (block_size); quantize per channel or per tensor")
        data = self.consts[node.input[0]]
        scale = self._scale(node)
        zero = self._zero_point(node, data.dtype)
        if zero is None:
            zero = np.zeros(scale.shape, data.dtype)
        axis = int(a.get("axis", 1))
        if scale.size != 1:
            if not -data.ndim <= axis < data.ndim or scale.shape != (data.shape[axis],):
                self._format_error(f"{scale.size} scales along axis {axis} of a tensor of shape {data.shape}")
        if zero.shape != scale.shape and zero.size != scale.size:
            self._format_error(f"zero point {node.input[2]} of shape {zero.shape} for scales of shape "
                               f"{scale.shape}")
        return QConst(data, scale, zero.astype(np.int64), axis + data.ndim if axis < 0 else axis)

    def _scale(self, node) -> np.ndarray:
        """A Q / DQ node's scale, checked: finite and positive."""
        name = self._input_name(node, 1, "scale")
        scale = np.asarray(self._const(name, "scale"))
        if not np.issubdtype(scale.dtype, np.floating) or scale.size == 0:
            self._format_error(f"scale {name} of type {scale.dtype} and size {scale.size}; scales are floats")
        if not np.all(np.isfinite(scale) & (scale > 0)):
            bad = scale.reshape(-1)[~(np.isfinite(scale) & (scale > 0)).reshape(-1)][0]
            self._format_error(f"scale {name} holds {bad}; quantization scales are finite and positive "
                               "(re-quantize the model)")
        return scale.astype(np.float32)

    def _zero_point(self, node, dtype) -> np.ndarray | None:
        """A Q / DQ node's zero point (None when absent), of the quantized type ``dtype`` if given."""
        if len(node.input) < 3 or not node.input[2]:
            return None
        zero = np.asarray(self._const(node.input[2], "zero point"))
        if not np.issubdtype(zero.dtype, np.integer) or (dtype is not None and zero.dtype != dtype):
            self._format_error(f"zero point {node.input[2]} of type {zero.dtype}"
                               + (f" for {np.dtype(dtype).name} data" if dtype is not None else "")
                               + "; it must have the quantized type")
        return zero

    def _quant(self, node) -> tuple[float, int]:
        """The per-tensor (scale, zero point) of an activation's Q or DQ node, int8 only."""
        for i, what in ((1, "scale"), (2, "zero point")):
            if len(node.input) > i and node.input[i] and node.input[i] not in self.consts:
                self._unsupported(f"its {what} is computed at run time, not a constant")
        scale = self._scale(node)
        zero = self._zero_point(node, None)
        if zero is None or zero.dtype != np.int8:
            kind = "uint8 (the default without a zero point)" if zero is None else str(zero.dtype)
            self._unsupported(f"activations quantized to {kind}; tinytrain's int8 graphs take "
                              f"int8 activations: {REDO}")
        if scale.size != 1 or zero.size != 1:
            self._unsupported("an activation quantized per channel; activations need one scale "
                              "and zero point per tensor")
        return float(scale.reshape(())), int(zero.reshape(()))

    def _qvalue(self, name: str, what: str = "input") -> QValue:
        value = self.values.get(name)
        if isinstance(value, QValue):
            return value
        if name in self.consts or name in self.qconsts:
            self._unsupported(f"its {what} ({name}) is a constant; int8 ops here take activations")
        if name == self.input_name:
            self._unsupported(f"it reads the float model input {name}; every use of the input "
                              f"must go through QuantizeLinear: {REDO}")
        self._unsupported(f"its {what} ({name}) is not an int8 value (no DequantizeLinear before "
                          f"it): {REDO}")

    def _weight(self, name: str, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
        """int8 weight data and its scale per output channel (along ``channel_axis``)."""
        if name not in self.qconsts:
            self._unsupported(f"its weight ({name}) is not a DequantizeLinear of an int8 "
                              f"constant: {REDO}")
        q = self.qconsts[name]
        if q.data.dtype != np.int8:
            self._unsupported(f"weights of type {q.data.dtype}; quantize weights to int8 "
                              "(weight_type=QuantType.QInt8)")
        if np.any(q.zero != 0):
            self._unsupported("weights with a non-zero zero point; quantize weights symmetrically "
                              "(the default for QInt8 weights)")
        channels = q.data.shape[channel_axis]
        if q.scale.size == 1:
            return q.data, np.full(channels, float(q.scale.reshape(())))
        if q.axis != channel_axis or q.scale.size != channels:
            self._unsupported(f"weight scales along axis {q.axis}; per-channel scales must run "
                              f"along the output channels (axis {channel_axis})")
        return q.data, q.scale.astype(np.float64).reshape(-1)

    def _int_bias(self, name: str | None, sx: float, sw: np.ndarray) -> np.ndarray | None:
        """The int32 bias at scale ``s_x·s_w``: the file's, or a float bias quantized as
        onnxruntime does (``round(b / (s_x·s_w))`` with float32 scales)."""
        if not name:
            return None
        target = np.float32(sx) * sw.astype(np.float32)
        if name in self.qconsts:
            q = self.qconsts[name]
            data = q.data.astype(np.int64).reshape(-1)
            if data.size not in (1, target.size):
                self._unsupported(f"a bias of {data.size} values for {target.size} channels")
            data = np.broadcast_to(data, target.shape)
            zero = np.broadcast_to(q.zero.reshape(-1), data.shape)
            scale = np.broadcast_to(q.scale.reshape(-1), data.shape).astype(np.float32)
            if q.data.dtype == np.int32 and not zero.any() and np.allclose(scale, target, rtol=1e-6, atol=0):
                return data
            data = data - zero
            real = data * scale.astype(np.float64)
        elif name in self.consts:
            real = self.consts[name].astype(np.float64).reshape(-1)
        else:
            self._unsupported(f"its bias ({name}) is computed at run time, not a constant")
        real = np.broadcast_to(real, target.shape)
        quantized = np.round(real.astype(np.float32) / target).astype(np.float64)
        return np.clip(quantized, -(2 ** 31), 2 ** 31 - 1).astype(np.int64)

    def _requant(self, out_name: str) -> tuple[float, int, int, int, str]:
        """The QuantizeLinear an op's float output goes through, with a Relu / Clip on the way
        (``op → act → Q``, or ``op → Q → DQ → act → Q`` with one quantization) fused into
        the clamp. Returns (s_y, z_y, lo, hi, the name of the int8 result); folds the nodes."""
        folded, bounds = [], None
        name = out_name
        reader = self._sole_reader(name)
        if reader is not None and reader[1].op_type in ("Relu", "Clip"):
            bounds = self._act_bounds(reader[1])
            folded.append(reader[0])
            name = reader[1].output[0]
            reader = self._sole_reader(name)
        if reader is None or reader[1].op_type != "QuantizeLinear":
            self._unsupported(f"its output {name} is not quantized (one QuantizeLinear must be "
                              f"its only reader): {REDO}")
        q_index, q_node = reader
        sy, zy = self._quant(q_node)
        folded.append(q_index)
        name = q_node.output[0]
        if bounds is None:  # op → Q → DQ → Relu/Clip → Q, all one quantization
            dq = self._sole_reader(name)
            act = dq and self._sole_reader(dq[1].output[0])
            q2 = act and self._sole_reader(act[1].output[0])
            if (dq and dq[1].op_type == "DequantizeLinear" and act and act[1].op_type in ("Relu", "Clip")
                    and q2 and q2[1].op_type == "QuantizeLinear"
                    and _same(self._quant(dq[1]), (sy, zy)) and _same(self._quant(q2[1]), (sy, zy))):
                bounds = self._act_bounds(act[1])
                folded += [dq[0], act[0], q2[0]]
                name = q2[1].output[0]
        lo, hi = -128, 127
        if bounds is not None:
            low, high = bounds
            if np.isfinite(low):
                lo = max(lo, zy + int(np.round(np.float32(low) / np.float32(sy))))
            if np.isfinite(high):
                hi = min(hi, zy + int(np.round(np.float32(high) / np.float32(sy))))
            if lo > hi:
                self._unsupported(f"its activation clamps every value (bounds {bounds})")
        self.folded.update(folded)
        return sy, zy, lo, hi, name

    def _act_bounds(self, node) -> tuple[float, float]:
        if node.op_type == "Relu":
            return 0.0, float("inf")
        a = self._attrs(node)
        lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))
        saved = self.node
        self.node = node
        if len(node.input) > 1 and node.input[1]:
            lo = float(self._const(node.input[1], "min"))
        if len(node.input) > 2 and node.input[2]:
            hi = float(self._const(node.input[2], "max"))
        self.node = saved
        return lo, hi

    def _source(self, node) -> str:
        return node.name or node.output[0]

    # ---- Q / DQ and pass-through ops -----------------------------------------
    def _q_QuantizeLinear(self, node, index):
        quant = self._quant(node)
        if node.input[0] == self.input_name:
            if self.em.input_quant is not None and not _same(self.em.input_quant, quant):
                self._unsupported("the model input is quantized twice, with different scales")
            self.em.input_quant = quant
            return QValue(self.em.entry, *quant)
        x = self.values.get(node.input[0])
        if not isinstance(x, QValue):
            self._unsupported(f"it quantizes {node.input[0]}, a float value that no supported "
                              f"int8 op computes: {REDO}")
        if not _same(x.quant, quant):
            self._unsupported(f"it requantizes {node.input[0]} from scale {x.scale:g} / zero "
                              f"point {x.zero} to {quant[0]:g} / {quant[1]}; a pass-through op "
                              "must keep its input's quantization")
        return x

    def _q_DequantizeLinear(self, node, index):
        x = self._qvalue(node.input[0])
        if not _same(x.quant, self._quant(node)):
            self._unsupported("it dequantizes with another scale or zero point than the "
                              "QuantizeLinear that made its input")
        return x

    def _any_value(self, name: str):
        return self.values[name] if name in self.values else self._qvalue(name)

    def _q_Identity(self, node, index):
        return self._any_value(node.input[0])

    def _q_Dropout(self, node, index):
        self._qvalue(node.input[0])
        return self._op_Dropout(node, index)  # the float reader's checks, on the int8 value

    def _q_reshaped(self, node, index):
        """Reshape / Flatten / Squeeze / Unsqueeze: the float reader's, on the int8 value."""
        x = self._qvalue(node.input[0])
        self.values[node.input[0]] = x.var
        try:
            y = self._reshaped(node, index)
        finally:
            self.values[node.input[0]] = x
        return QValue(y, x.scale, x.zero)

    _q_Reshape = _q_Flatten = _q_Squeeze = _q_Unsqueeze = _q_reshaped

    def _q_Softmax(self, node, index):
        chain = self._chain_to_output(node.output[0])
        if chain is None:
            self._unsupported("a Softmax inside the network; only a trailing one is dropped")
        self.folded.update(chain)
        self.values[self.output_name] = self._any_value(node.input[0])
        return self.values[self.output_name]

    def _q_Relu(self, node, index):
        self._unsupported("a Relu / Clip is fused into the Conv, Gemm, MatMul or Add right before "
                          "it, whose output only it may read; this one follows something else")

    _q_Clip = _q_Relu

    # ---- layers ------------------------------------------------------------
    def _q_Conv(self, node, index):
        a = self._attrs(node)
        x = self._qvalue(node.input[0])
        weight, sw = self._weight(node.input[1], 0)
        if weight.ndim != 4:
            self._unsupported(f"only 2-D convolutions; the weight has rank {weight.ndim}")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self._unsupported("auto_pad; export with explicit pads")
        dilation = self._ints(a, "dilations", [1, 1], 2, 1)
        if dilation != [1, 1]:
            self._unsupported(f"dilation {dilation}: TVM 0.27 cannot differentiate dilated convolutions")
        strides = self._ints(a, "strides", [1, 1], 2, 1)
        pads = self._ints(a, "pads", [0, 0, 0, 0], 4, 0)
        groups = self._ints(a, "group", [1], 1, 1)[0]
        shape = self._image(x.var)
        c_out, c_group, kh, kw = weight.shape
        if shape[1] != c_group * groups or c_out % groups:
            self._format_error(f"weight {node.input[1]} of shape {weight.shape} with group {groups} "
                               f"does not fit an input of {shape[1]} channels")
        if shape[2] + pads[0] + pads[2] < kh or shape[3] + pads[1] + pads[3] < kw:
            self._format_error(f"a {kh}x{kw} kernel larger than its padded {shape[2]}x{shape[3]} input")
        bias = self._int_bias(node.input[2] if len(node.input) > 2 else None, x.scale, sw)
        sy, zy, lo, hi, out = self._requant(node.output[0])
        q = single_rounding(QConvParams(
            x.scale, x.zero, tuple(float(s) for s in sw), sy, zy, lo, hi,
            tuple(strides), tuple(pads), groups))
        self.values[out] = QValue(self.em.qconv2d(x.var, weight, bias, q, self._source(node)), sy, zy)

    def _linear(self, node, x: QValue, weight: np.ndarray, sw: np.ndarray, bias_name: str | None,
                out_name: str, folded: list[int]):
        """``weight`` (out, in) int8 with scales ``sw``; ``out_name`` the float result."""
        shape = self.em.shape(x.var)
        if len(shape) != 2 or shape[1] != weight.shape[1]:
            self._unsupported(f"input of shape {shape} for a weight of shape {weight.shape}; "
                              "flatten to (batch, features) first")
        bias = self._int_bias(bias_name, x.scale, sw)
        to_output = self._chain_to_output(out_name)
        if to_output is not None and (self.float_classifier or out_name == self.output_name):
            # the paper's float32 classifier: same function, float weights
            features = self.em.dequantize(x.var, x.scale, x.zero)
            w_float = weight.astype(np.float64) * sw[:, None]
            b_float = None if bias is None else bias * sw * x.scale
            self.folded.update(folded + to_output)
            self.values[self.output_name] = self.em.linear(features, w_float, b_float, self._source(node))
            return
        self.folded.update(folded)
        sy, zy, lo, hi, out = self._requant(out_name)
        q = QConvParams(x.scale, x.zero, tuple(float(s) for s in sw), sy, zy, lo, hi)
        self.values[out] = QValue(self.em.qlinear(x.var, weight, bias, q, self._source(node)), sy, zy)

    def _q_Gemm(self, node, index):
        a = self._attrs(node)
        if a.get("transA", 0):
            self._unsupported("transA=1")
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            self._unsupported("alpha or beta other than 1; fold them into the weights before quantizing")
        x = self._qvalue(node.input[0])
        trans_b = bool(a.get("transB", 0))
        weight, sw = self._weight(node.input[1], 0 if trans_b else 1)
        if not trans_b:
            weight = weight.T
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        self._linear(node, x, weight, sw, bias, node.output[0], [])

    def _q_MatMul(self, node, index):
        x = self._qvalue(node.input[0])
        weight, sw = self._weight(node.input[1], 1)
        bias, out, folded = None, node.output[0], []
        # the bias Add, right after (MatMul → Add) or after a requantization onnxruntime
        # puts between them (MatMul → Q → DQ → Add, bias int8): read as one layer that
        # adds the bias at s_x·s_w and skips the intermediate rounding (within one step)
        path, name = [], out
        step = self._sole_reader(name)
        if step is not None and step[1].op_type == "QuantizeLinear":
            dq = self._sole_reader(step[1].output[0])
            if dq is not None and dq[1].op_type == "DequantizeLinear":
                path, name, step = [step[0], dq[0]], dq[1].output[0], self._sole_reader(dq[1].output[0])
        if step is not None and step[1].op_type == "Add":
            other = [n for n in step[1].input if n != name]
            if len(other) == 1 and (other[0] in self.consts or other[0] in self.qconsts):
                bias, out, folded = other[0], step[1].output[0], [*path, step[0]]
        self._linear(node, x, weight.T, sw, bias, out, folded)

    def _q_Add(self, node, index):
        a, b = (self._qvalue(name, "operand") for name in node.input[:2])
        if self.em.shape(a.var) != self.em.shape(b.var):
            self._unsupported(f"operands of shapes {self.em.shape(a.var)} and "
                              f"{self.em.shape(b.var)}; the int8 Add takes equal shapes")
        sy, zy, lo, hi, out = self._requant(node.output[0])
        q = QAddParams(a.scale, a.zero, b.scale, b.zero, sy, zy, lo, hi)
        self.values[out] = QValue(self.em.qadd(a.var, b.var, q), sy, zy)

    def _pool(self, node, x: QValue, kernel, strides, pads, count_include_pad: bool):
        sy, zy, lo, hi, out = self._requant(node.output[0])
        padded = any(pads)
        if _same(x.quant, (sy, zy)) and not (padded and count_include_pad):
            y = self.em.qavg_pool(x.var, QPoolParams(kernel, strides, pads, lo, hi))
        elif padded and not count_include_pad:
            self._unsupported("a padded average pool that excludes the padding and quantizes its "
                              "output differently from its input")
        else:  # the window's mean, requantized: a depthwise conv with constant weights 1
            channels = self.em.shape(x.var)[1]
            window = kernel[0] * kernel[1]
            q = single_rounding(QConvParams(x.scale, x.zero, (1.0 / window,) * channels, sy, zy,
                                            lo, hi, strides, pads, channels))
            ones = relax.const(np.ones((channels, 1, *kernel), np.int8))
            zeros = relax.const(np.zeros(channels, np.int32))
            y = int8_ops.emit_qconv(self.em.bb, x.var, ones, zeros, q)
        self.values[out] = QValue(y, sy, zy)

    def _q_GlobalAveragePool(self, node, index):
        x = self._qvalue(node.input[0])
        shape = self.em.shape(x.var)
        if len(shape) != 4:
            self._unsupported(f"an input of rank {len(shape)}; expected NCHW")
        self._pool(node, x, (shape[2], shape[3]), (1, 1), (0, 0, 0, 0), False)

    def _q_AveragePool(self, node, index):
        a, kernel, strides, pads = self._pool_args(node)
        x = self._qvalue(node.input[0])
        self._pool(node, x, tuple(int(k) for k in kernel), tuple(int(s) for s in strides),
                   tuple(int(p) for p in pads), bool(a.get("count_include_pad", 0)))

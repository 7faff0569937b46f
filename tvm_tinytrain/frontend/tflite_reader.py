"""TFLite (float) → backbone IRModule, through :class:`RelaxEmitter`.

TFLite is NHWC with OHWI weights; the emitter is NCHW / OIHW. The model's
input stays NHWC (``main`` permutes it once), every 4-D value inside is NCHW,
and the reader maps axes where an op names them (MEAN, PAD, RESHAPE,
FULLY_CONNECTED on a 4-D input). Fused activations become their own op.
"""

from __future__ import annotations

import math

import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator
from tflite.TensorType import TensorType

from ..errors import ModelFormatError, ModelStructureError, TinyTrainError, UnsupportedOperatorError
from .emitter import RelaxEmitter, Value

OP_NAMES = {code: name for name, code in vars(BuiltinOperator).items() if not name.startswith("_")}
TYPE_NAMES = {code: name for name, code in vars(TensorType).items() if not name.startswith("_")}
NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}
STORED_TYPES = {TensorType.FLOAT32: np.float32, TensorType.FLOAT16: np.float16,
                TensorType.INT32: np.int32, TensorType.INT64: np.int64, TensorType.INT8: np.int8,
                TensorType.UINT8: np.uint8, TensorType.INT16: np.int16}
ZERO_POINT_RANGE = {TensorType.INT8: (-128, 127), TensorType.UINT8: (0, 255), TensorType.INT16: (0, 0)}
SUPPORTED = [
    "ADD", "AVERAGE_POOL_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D",
    "MEAN", "PAD", "RELU", "RELU6", "RESHAPE", "SOFTMAX",
]


def read_tflite(data: bytes, path: str, float_dtype: str = "float32",
                float_classifier: bool = True, dequantize: bool = False,
                weight_headroom: dict[int, int] | None = None) -> tuple:
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        if model.SubgraphsLength() < 1:
            raise ValueError("no subgraph")
        graph = model.Subgraphs(0)
        graph.OperatorsLength()
        graph.Tensors(0).Type()
        for i in range(model.BuffersLength()):  # weights sit at the end: a cut file loses them
            model.Buffers(i).DataAsNumpy()
    except Exception as err:  # flatbuffers raises struct/index errors on truncated files
        raise ModelFormatError(
            f"{path}: not a readable TFLite model ({err.__class__.__name__}: {err}); "
            "the file may be truncated"
        )
    from .tflite_dequantized import DequantizedTfliteReader
    from .tflite_int8 import Int8TfliteReader, int8_input_quantize

    reader = None
    try:
        graph = model.Subgraphs(0)
        first = graph.Inputs(0) if graph.InputsLength() == 1 else -1
        quantized = 0 <= first < graph.TensorsLength() and (
            graph.Tensors(first).Type() == TensorType.INT8 or int8_input_quantize(model) is not None)
        if weight_headroom and (dequantize or not quantized):
            raise ModelStructureError(
                f"{path}: weight_headroom re-quantizes int8 weights; this model is read as float"
                + (" (dequantize=True)" if quantized else "")
            )
        if quantized and dequantize:
            reader = DequantizedTfliteReader(model, path, float_dtype)
        elif quantized:
            reader = Int8TfliteReader(model, path, float_dtype, float_classifier, weight_headroom)
        else:
            reader = _TfliteReader(model, path, float_dtype)
        return reader.run()
    except TinyTrainError:
        raise
    except Exception as err:  # a field no check above foresaw: still one line, naming where
        where = f"operator {reader.label}" if reader is not None else "the graph"
        detail = (str(err).strip().splitlines() or [""])[-1][:160]
        raise ModelFormatError(
            f"{path}: {where} could not be read ({err.__class__.__name__}: {detail}); the file is "
            "corrupt, or uses the operator in a way tinytrain does not support"
        ) from err


def printable(raw: bytes, limit: int) -> str:
    """``raw`` as one short line: non-printable characters escaped, cut at ``limit`` with '...'."""
    text = raw.decode("utf-8", "replace").encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _options(op, cls):
    table = op.BuiltinOptions()
    opts = cls()
    if table is not None:
        opts.Init(table.Bytes, table.Pos)
    return opts


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _TfliteReader:
    VALUE_TYPE = TensorType.FLOAT32  # the type of every activation

    def __init__(self, model, path: str, float_dtype: str):
        self.model, self.path, self.float_dtype = model, path, float_dtype
        self.graph = model.Subgraphs(0)
        self.values: dict[int, Value] = {}
        self.folded: dict[int, np.ndarray] = {}  # DEQUANTIZE of a constant, done at import
        self.label = "input"

    # ---- tensors -----------------------------------------------------------
    # Every constant's bytes become an array in one place (``_stored``), and get their meaning in
    # one other (``_const``): a type or quantization not in these tables stops the import.
    def _tensor(self, index: int):
        if not 0 <= index < self.graph.TensorsLength():
            raise ModelFormatError(f"{self.path}: operator {self.label} names tensor {index}, but the "
                                   f"graph has {self.graph.TensorsLength()}; the file is corrupt")
        return self.graph.Tensors(index)

    def _name(self, index: int, limit: int = 80) -> str:
        """A tensor's name as a message can show it: printable, at most ``limit`` characters (a
        corrupt file's string may be any bytes of any length); a layer's source name takes 1000."""
        return printable(self._tensor(index).Name() or b"", limit)

    def _shape(self, index: int) -> tuple[int, ...]:
        tensor = self._tensor(index)
        shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
        if any(d < 0 for d in shape[1:]) or (shape and shape[0] < -1) or any(d > 1 << 24 for d in shape):
            raise ModelStructureError(f"{self.path}: tensor {self._name(index)} has shape {list(shape)}; "
                                      "dimensions must be positive; the file is corrupt")
        return shape

    def _stored(self, index: int, what: str) -> np.ndarray:
        """A constant tensor's values as stored (int8 weights stay int8), or one folded at import."""
        if index in self.folded:
            return self.folded[index]
        tensor = self._tensor(index)
        buf = self.model.Buffers(tensor.Buffer()) if 0 <= tensor.Buffer() < self.model.BuffersLength() \
            else None
        raw = buf.DataAsNumpy() if buf is not None else 0
        if isinstance(raw, int) or raw.size == 0:
            self._unsupported(f"its {what} {self._name(index)} is computed at run time, not a constant")
        dtype = STORED_TYPES.get(tensor.Type())
        if dtype is None:
            self._unsupported(f"its {what} {self._name(index)} has type {TYPE_NAMES.get(tensor.Type())}")
        shape = self._shape(index)
        count = int(np.prod(shape)) if shape else 1
        if raw.size != count * np.dtype(dtype).itemsize:
            raise ModelFormatError(
                f"{self.path}: tensor {self._name(index)} of shape {list(shape)} holds {raw.size} bytes, "
                f"not {count * np.dtype(dtype).itemsize}; the file is corrupt")
        array = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape)
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ModelStructureError(f"{self.path}: tensor {self._name(index)} holds NaN or infinite "
                                      "values; the file is damaged or was saved after training diverged")
        return array

    def _const(self, index: int, what: str) -> np.ndarray:
        """The values a constant stands for: a float, a dequantized integer (weight-only int8
        files, int32 biases of int8 files), or an integer that is not quantized (shapes, axes)."""
        array = self._stored(index, what)
        quant = self._quantization(index) if array.dtype.kind in "iu" else None
        if quant is None:
            if array.dtype in (np.int8, np.uint8, np.int16):
                self._unsupported(f"its {what} {self._name(index)} is {array.dtype} with no scale, so "
                                  "its real values are unknown")
            return array
        scale, zero, axis = quant
        if scale.size > 1:  # per channel, along the quantized dimension
            shape = [1] * array.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return (array.astype(np.float64) - zero) * scale

    def _quantization(self, index: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(scales, zero points, quantized dimension) of a tensor, or None when it has none;
        checked: finite positive scales, zero points in the type's range, one per channel."""
        tensor = self._tensor(index)
        q = tensor.Quantization()
        if q is None or q.ScaleLength() == 0:
            return None
        scale = q.ScaleAsNumpy().astype(np.float64)
        zero = q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength() else np.zeros(1, np.int64)
        axis, shape = q.QuantizedDimension(), self._shape(index)
        name = self._name(index)
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise ModelStructureError(f"{self.path}: tensor {name} has a quantization scale that is not "
                                      f"a finite positive number ({scale[:4].tolist()}); the file is corrupt")
        lo, hi = ZERO_POINT_RANGE.get(tensor.Type(), (-(1 << 31), (1 << 31) - 1))
        if zero.size not in (1, scale.size) or np.any((zero < lo) | (zero > hi)):
            raise ModelStructureError(f"{self.path}: tensor {name} has zero points {zero[:4].tolist()} "
                                      f"outside {lo}..{hi} or not one per scale; the file is corrupt")
        if scale.size > 1 and not (0 <= axis < len(shape) and shape[axis] == scale.size):
            raise ModelStructureError(f"{self.path}: tensor {name} has {scale.size} scales along dimension "
                                      f"{axis} of shape {list(shape)}; the file is corrupt")
        return scale, np.broadcast_to(zero, scale.shape).copy(), axis

    def _is_const(self, index: int) -> bool:
        if index in self.folded:
            return True
        buffer = self._tensor(index).Buffer()
        buf = self.model.Buffers(buffer) if 0 <= buffer < self.model.BuffersLength() else None
        return buf is not None and not isinstance(buf.DataAsNumpy(), int) and buf.DataLength() > 0

    def _value(self, index: int) -> Value:
        if index in self.values:
            return self.values[index]
        array = self._const(index, "operand").astype(self.float_dtype)
        if array.ndim == 4:
            array = array.transpose(0, 3, 1, 2)
        return self.em.constant(array)

    # ---- driver ------------------------------------------------------------
    def _input(self):
        """(tensor index, name, shape with batch 1) of the value the network starts from."""
        if self.graph.InputsLength() != 1:
            raise ModelStructureError(
                f"{self.path}: the model has {self.graph.InputsLength()} inputs; "
                "tinytrain trains single-input models"
            )
        if self.graph.OutputsLength() != 1:
            raise ModelStructureError(
                f"{self.path}: the model has {self.graph.OutputsLength()} outputs; expected one"
            )
        index = self.graph.Inputs(0)
        tensor = self._tensor(index)
        name = self._name(index, 1000)
        if tensor.Type() != self.VALUE_TYPE:
            raise ModelStructureError(
                f"{self.path}: input {name} is {TYPE_NAMES.get(tensor.Type())}; tinytrain "
                "trains float32 and int8 TFLite models; convert the model to one of them"
            )
        shape = list(self._shape(index))
        signature = (
            [int(d) for d in tensor.ShapeSignatureAsNumpy()]
            if tensor.ShapeSignatureLength() else shape
        )
        for axis, dim in enumerate(signature):
            if dim < 0 and axis > 0:
                raise ModelStructureError(
                    f"{self.path}: input {name} has a dynamic dimension at axis {axis}; "
                    "only the batch may be dynamic. Convert the model with a fixed input size"
                )
        if len(shape) not in (2, 4) or 0 in shape[1:]:
            raise ModelStructureError(
                f"{self.path}: input {name} has shape {shape}; tinytrain reads NHWC images "
                "(rank 4) and feature vectors (rank 2) with no empty dimension"
            )
        shape[0] = 1
        return index, name, tuple(shape)

    def run(self):
        index, name, shape = self._input()
        self.em = self._emitter(name, shape)
        self.values[index] = self.em.entry
        self.output = self.graph.Outputs(0)
        for position in range(self.graph.OperatorsLength()):
            self.op = op = self.graph.Operators(position)
            self.op_name = self._op_name(op)
            if op.OutputsLength() < 1:
                raise ModelFormatError(f"{self.path}: operator {position} ({self.op_name}) has no output; "
                                       "the file is corrupt")
            self.label = f"{position} ({self._name(op.Outputs(0))})"
            if op.Outputs(0) == index:
                continue  # the QUANTIZE that makes the int8 input (see Int8TfliteReader)
            handler = getattr(self, f"_op_{self.op_name}", None)
            if handler is None:
                raise UnsupportedOperatorError("TFLite", self.op_name, self.label, SUPPORTED)
            out_type = self._tensor(op.Outputs(0)).Type()
            if out_type != self.VALUE_TYPE and self.op_name not in ("SOFTMAX", "DEQUANTIZE"):
                self._unsupported(f"output type {TYPE_NAMES.get(out_type)}")
            for i in range(op.InputsLength()):
                if op.Inputs(i) >= 0 and op.Inputs(i) not in self.values and not self._is_const(op.Inputs(i)):
                    raise ModelStructureError(
                        f"{self.path}: operator {self.label} reads tensor {self._name(op.Inputs(i))}, which "
                        "no earlier operator computes and the file does not hold; the graph is corrupt")
            value = handler(op)
            if value is not None:  # None: folded into a constant
                self._check_shape(op.Outputs(0), value)
                self.values[op.Outputs(0)] = value
        if self.output not in self.values:
            raise ModelStructureError(f"{self.path}: the output {self._name(self.output)} is not computed "
                                      "by any operator; the graph is corrupt")
        self._check_all_used()
        return self.em.finish(self._result(self._value(self.output)))

    def _check_all_used(self) -> None:
        """Every operator feeds the output: a result nobody reads means the file's output is not
        the network's last layer (a layer would be trained that the output never sees)."""
        read = {self.output}
        for position in range(self.graph.OperatorsLength()):
            op = self.graph.Operators(position)
            read.update(op.Inputs(i) for i in range(op.InputsLength()))
        for position in range(self.graph.OperatorsLength()):
            out = self.graph.Operators(position).Outputs(0)
            if out not in read:
                raise ModelStructureError(
                    f"{self.path}: the result of operator {position} ({self._name(out)}) is never used: the "
                    f"model's output {self._name(self.output)} is not its last layer; the file is corrupt")

    def _check_shape(self, index: int, value: Value) -> None:
        """The shape an operator computes is the one the file records for its output."""
        recorded = list(self._shape(index))
        ours = list(self.em.shape(value))
        if not recorded:
            return  # a file may leave shapes out
        recorded[0] = 1
        if len(recorded) == 4 and len(ours) == 4:
            recorded = [recorded[0], recorded[3], recorded[1], recorded[2]]  # NHWC → NCHW
        if ours != recorded and int(np.prod(ours)) != int(np.prod(recorded)):
            raise ModelStructureError(
                f"{self.path}: operator {self.label} computes shape {ours} but the file records "
                f"{recorded} for its output; the file is corrupt or the operator is read wrong")

    def _op_name(self, op) -> str:
        code = self.model.OperatorCodes(op.OpcodeIndex())
        opcode = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        return OP_NAMES.get(opcode, f"CUSTOM({opcode})")

    def _emitter(self, name: str, shape: tuple[int, ...]) -> RelaxEmitter:
        return RelaxEmitter(name, shape, self.float_dtype, "NHWC", self.float_dtype, "TFLite")

    def _result(self, value: Value) -> Value:
        return value

    def _feeds_output(self, op) -> bool:
        """The FC whose result is the output, directly or through the trailing softmax."""
        out = op.Outputs(0)
        if out == self.output:
            return True
        for position in range(self.graph.OperatorsLength()):
            nxt = self.graph.Operators(position)
            if any(nxt.Inputs(i) == out for i in range(nxt.InputsLength())):
                return nxt.Outputs(0) == self.output and self._op_name(nxt) == "SOFTMAX"
        return False

    def _unsupported(self, detail: str):
        raise UnsupportedOperatorError("TFLite", self.op_name, self.label, SUPPORTED, detail)

    def _activation(self, x: Value, fused: int) -> Value:
        if fused == 0:
            return x
        if fused == 1:
            return self.em.relu(x)
        if fused == 2:
            return self.em.clip(x, -1.0, 1.0)
        if fused == 3:
            return self.em.clip(x, 0.0, 6.0)
        self._unsupported(f"fused activation {fused}")

    def _padding(self, x: Value, kernel, strides, dilation, padding: int):
        """(top, left, bottom, right) of TFLite's SAME (0) or VALID (1) padding, once the window
        is checked: sizes, strides and dilations of at least 1, a window that fits."""
        _, _, h, w = self.em.shape(x)
        if padding not in (0, 1):
            self._unsupported(f"padding code {padding} (0 SAME, 1 VALID)")
        for what, pair in (("window", kernel), ("stride", strides), ("dilation", dilation)):
            if not all(1 <= int(v) <= 1 << 16 for v in pair):
                raise ModelStructureError(f"{self.path}: operator {self.label} has {what} {tuple(pair)}; "
                                          "each must be at least 1; the file is corrupt")
        reach = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
        if padding == 1 and (reach[0] > h or reach[1] > w):
            raise ModelStructureError(f"{self.path}: operator {self.label} has a {reach[0]}x{reach[1]} "
                                      f"window over a {h}x{w} input with VALID padding; the file is corrupt")
        if padding == 1:
            return (0, 0, 0, 0)
        top, bottom = _same_padding(h, kernel[0], strides[0], dilation[0])
        left, right = _same_padding(w, kernel[1], strides[1], dilation[1])
        return (top, left, bottom, right)

    def _bias(self, op) -> np.ndarray | None:
        if op.InputsLength() > 2 and op.Inputs(2) >= 0:
            return self._const(op.Inputs(2), "bias").astype(np.float64)
        return None

    # ---- operators ---------------------------------------------------------
    def _image(self, index: int) -> Value:
        """An operator's input that must be an image (NCHW inside)."""
        x = self._value(index)
        if len(self.em.shape(x)) != 4:
            self._unsupported(f"its input has shape {list(self.em.shape(x))}; it takes an NHWC image")
        return x

    def _conv(self, op, weight_oihw, groups, opts):
        x = self._image(op.Inputs(0))
        strides = (opts.StrideH(), opts.StrideW())
        dilation = (opts.DilationHFactor(), opts.DilationWFactor())
        padding = self._padding(x, weight_oihw.shape[2:], strides, dilation, opts.Padding())
        y = self.em.conv2d(x, weight_oihw, self._bias(op), strides, padding, dilation, groups,
                           source=self._name(op.Outputs(0), 1000))
        return self._activation(y, opts.FusedActivationFunction())

    def _op_CONV_2D(self, op):
        weight = self._const(op.Inputs(1), "weight").astype(np.float64).transpose(0, 3, 1, 2)
        x_channels = self.em.shape(self._value(op.Inputs(0)))[1]
        return self._conv(op, weight, x_channels // weight.shape[1],
                          _options(op, tflite.Conv2DOptions))

    def _op_DEPTHWISE_CONV_2D(self, op):
        weight = self._const(op.Inputs(1), "weight").astype(np.float64).transpose(3, 0, 1, 2)
        groups = self.em.shape(self._value(op.Inputs(0)))[1]
        return self._conv(op, weight, groups, _options(op, tflite.DepthwiseConv2DOptions))

    def _op_FULLY_CONNECTED(self, op):
        opts = _options(op, tflite.FullyConnectedOptions)
        weight = self._const(op.Inputs(1), "weight").astype(np.float64)
        x = self._flatten_nhwc(self._value(op.Inputs(0)), weight)
        y = self.em.linear(x, weight, self._bias(op), self._name(op.Outputs(0), 1000))
        return self._activation(y, opts.FusedActivationFunction())

    def _flatten_nhwc(self, x: Value, weight: np.ndarray) -> Value:
        """A fully connected layer's input as (1, features), NHWC order as TFLite flattens."""
        shape = self.em.shape(x)
        if weight.ndim != 2 or weight.shape[1] == 0 or int(np.prod(shape)) != weight.shape[1]:
            raise ModelStructureError(
                f"{self.path}: operator {self.label} has a weight of shape {list(weight.shape)} for an "
                f"input of shape {list(shape)} (batch 1); the file is corrupt")
        features = weight.shape[1]
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            x = self.em.permute(x, [0, 2, 3, 1])
        if len(shape) != 2 or shape[1] != features:
            x = self.em.reshape(x, (int(np.prod(shape)) // features, features))
        return x

    def _op_ADD(self, op):
        opts = _options(op, tflite.AddOptions)
        a, b = (self._broadcastable(op.Inputs(i), op.Inputs(1 - i)) for i in (0, 1))
        return self._activation(self.em.add(a, b), opts.FusedActivationFunction())

    def _broadcastable(self, index: int, other: int) -> Value:
        """A constant operand, laid out to broadcast against an NCHW value."""
        if index in self.values or not self._is_const(index):
            return self._value(index)
        array = self._const(index, "operand").astype(self.float_dtype)
        other_rank = len(self.em.shape(self._value(other)))
        if array.ndim == 4:
            array = array.transpose(0, 3, 1, 2)
        elif array.ndim == 1 and other_rank == 4:
            array = array.reshape(1, -1, 1, 1)
        return self.em.constant(array)

    def _pool(self, op):
        opts = _options(op, tflite.Pool2DOptions)
        x = self._image(op.Inputs(0))
        kernel = (opts.FilterHeight(), opts.FilterWidth())
        strides = (opts.StrideH(), opts.StrideW())
        return x, opts, kernel, strides, self._padding(x, kernel, strides, (1, 1), opts.Padding())

    def _op_AVERAGE_POOL_2D(self, op):
        x, opts, kernel, strides, padding = self._pool(op)
        y = self.em.avg_pool(x, kernel, strides, padding, count_include_pad=False)
        return self._activation(y, opts.FusedActivationFunction())

    def _op_MAX_POOL_2D(self, op):
        x, opts, kernel, strides, padding = self._pool(op)
        y = self.em.max_pool(x, kernel, strides, padding)
        return self._activation(y, opts.FusedActivationFunction())

    def _op_MEAN(self, op):
        x = self._value(op.Inputs(0))
        rank = len(self.em.shape(x))
        axes = [int(a) % rank for a in np.atleast_1d(self._const(op.Inputs(1), "axes"))]
        if rank == 4:
            axes = sorted(NHWC_TO_NCHW_AXIS[a] for a in axes)
        keep = bool(_options(op, tflite.ReducerOptions).KeepDims())
        y = self.em.mean(x, axes, keepdims=keep)
        if rank == 4 and not keep and len(self.em.shape(y)) > 1 and 1 not in axes:
            # channels survived but H/W order is mixed: go back to NHWC meaning
            self._unsupported("MEAN keeping spatial axes and dropping others")
        return y

    def _op_RESHAPE(self, op):
        x = self._value(op.Inputs(0))
        out_shape = [int(d) for d in self._tensor(op.Outputs(0)).ShapeAsNumpy()]
        out_shape[0] = 1
        shape = self.em.shape(x)
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            x = self.em.permute(x, [0, 2, 3, 1])
        if len(out_shape) == 4:
            y = self.em.reshape(x, tuple(out_shape))
            return self.em.permute(y, [0, 3, 1, 2])
        return self.em.reshape(x, tuple(out_shape))

    def _op_SOFTMAX(self, op):
        x = self._value(op.Inputs(0))
        if op.Outputs(0) == self.output:
            return x  # a trailing softmax is dropped: training and predict work on logits
        beta = _options(op, tflite.SoftmaxOptions).Beta()
        if beta != 1.0:
            x = self.em.multiply(x, self.em.constant(np.asarray(beta)))
        return self.em.softmax(x, len(self.em.shape(x)) - 1)

    def _op_PAD(self, op):
        x = self._value(op.Inputs(0))
        pads = self._const(op.Inputs(1), "paddings").astype(np.int64)
        if pads.shape[0] == 4:
            pads = pads[[0, 3, 1, 2]]
        return self.em.pad(x, [int(v) for v in pads.reshape(-1)], 0.0)

    def _op_DEQUANTIZE(self, op):
        """A constant stored float16 or int8 (weight-only quantization) → its float values, folded."""
        if not self._is_const(op.Inputs(0)) or op.Inputs(0) in self.values:
            self._unsupported("a DEQUANTIZE of an activation (int8 activations in a float model); "
                              "convert the model to full int8 or float32")
        self.folded[op.Outputs(0)] = self._const(op.Inputs(0), "input").astype(np.float64)

    def _op_RELU(self, op):
        return self.em.relu(self._value(op.Inputs(0)))

    def _op_RELU6(self, op):
        return self.em.clip(self._value(op.Inputs(0)), 0.0, 6.0)

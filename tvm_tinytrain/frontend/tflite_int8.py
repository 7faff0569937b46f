"""int8 TFLite → a true integer backbone, through :class:`RelaxEmitter`'s quantized layers.

Activations stay int8 between layers, conv / depthwise / fully connected layers
accumulate in int32 with their per-channel requantization fused in, ADD rescales
both inputs as TFLite does (``relay_passes.int8_ops``). Every tensor carries its
(scale, zero point) from the file. The model takes int8 input as the file does
(``tvm_tinytrain.quantize_input`` converts float data); its output is the float
logits: the last layer's int8 output dequantized, or, with ``float_classifier``
(the paper's choice, the default for training), a float32 fully connected layer
on the dequantized features, its weights and bias dequantized from the file.
"""

from __future__ import annotations

import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator
from tflite.TensorType import TensorType

from relay_passes.int8_ops import QAddParams, QConvParams, QPoolParams

from .emitter import RelaxEmitter, Value
from .tflite_reader import _options, _TfliteReader

ACTIVATIONS = {0: None, 1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}


class Int8TfliteReader(_TfliteReader):
    VALUE_TYPE = TensorType.INT8

    def __init__(self, model, path: str, float_dtype: str, float_classifier: bool,
                 weight_headroom: dict[int, int] | None = None):
        super().__init__(model, path, float_dtype)
        self.float_classifier = float_classifier
        self.weight_headroom = weight_headroom
        self.quant: dict[int, tuple[float, int]] = {}  # activation → (scale, zero point)
        self.float_values: set[int] = set()  # activations already dequantized

    def _input(self):
        """The int8 tensor the network starts from: the file's input, or, when the file takes
        float and quantizes it first (``QUANTIZE`` as its first operator), that QUANTIZE's output:
        the model then takes int8 input like any int8 model (``quantize_input`` makes it)."""
        quantize = int8_input_quantize(self.model)
        if quantize is None:
            index, name, shape = super()._input()
        else:
            self.VALUE_TYPE = TensorType.FLOAT32  # the check of the file's input
            _, name, shape = super()._input()
            self.VALUE_TYPE = TensorType.INT8
            index = quantize.Outputs(0)
            if self._shape(index)[1:] != shape[1:]:
                self._unsupported("the QUANTIZE of the input changes its shape")
        self.input_index = index
        return index, name, shape

    def _emitter(self, name, shape) -> RelaxEmitter:
        em = RelaxEmitter(name, shape, "int8", "NHWC", self.float_dtype, "TFLite", self.weight_headroom)
        em.input_quant = self._qparams(self.input_index)
        self.quant[self.input_index] = em.input_quant
        return em

    def _result(self, value: Value) -> Value:
        if self.output in self.float_values:
            return value
        return self.em.dequantize(value, *self.quant[self.output])

    # ---- quantization parameters -------------------------------------------
    def _scales(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        quant = self._quantization(index)
        if quant is None:
            self._unsupported(f"tensor {self._name(index)} has no quantization")
        return quant[0], quant[1]

    def _qparams(self, index: int) -> tuple[float, int]:
        scale, zero = self._scales(index)
        return float(scale[0]), int(zero[0])

    def _clamp(self, fused: int, out: int) -> tuple[int, int]:
        """TFLite's CalculateActivationRangeQuantized for a fused activation."""
        if fused not in ACTIVATIONS:
            self._unsupported(f"fused activation {fused}")
        lo, hi = -128, 127
        if ACTIVATIONS[fused] is not None:
            scale, zero = self.quant[out]
            low, high = ACTIVATIONS[fused]
            lo = max(lo, zero + int(np.round(np.float32(low) / np.float32(scale))))
            if high is not None:
                hi = min(hi, zero + int(np.round(np.float32(high) / np.float32(scale))))
        return lo, hi

    def _int8_weight(self, op) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        w_index = op.Inputs(1)
        if self._tensor(w_index).Type() != TensorType.INT8:
            self._unsupported("weights that are not int8 (hybrid or float weights)")
        weight = self._stored(w_index, "weight")
        scales, zeros = self._scales(w_index)
        if np.any(zeros != 0):
            self._unsupported("weights with a non-zero zero point")
        bias = None
        if op.InputsLength() > 2 and op.Inputs(2) >= 0:
            bias = self._stored(op.Inputs(2), "bias").astype(np.int64)
        return weight, scales, bias

    def _layer_quant(self, op, channels: int, scales: np.ndarray, **geometry) -> QConvParams:
        sx, zx = self.quant[op.Inputs(0)]
        out = op.Outputs(0)
        self.quant[out] = self._qparams(out)
        sy, zy = self.quant[out]
        sw = np.broadcast_to(scales, (channels,))
        fused = geometry.pop("fused")
        lo, hi = self._clamp(fused, out)
        return QConvParams(sx, zx, tuple(float(s) for s in sw), sy, zy, lo, hi, **geometry)

    def _source(self, op) -> str:
        return self._name(op.Outputs(0), 1000)

    # ---- operators ---------------------------------------------------------
    def _qconv(self, op, weight_oihw, scales, bias, groups, opts):
        x = self._value(op.Inputs(0))
        strides = (opts.StrideH(), opts.StrideW())
        dilation = (opts.DilationHFactor(), opts.DilationWFactor())
        if dilation != (1, 1):
            self._unsupported(f"dilation {dilation}")
        padding = self._padding(x, weight_oihw.shape[2:], strides, dilation, opts.Padding())
        q = self._layer_quant(op, weight_oihw.shape[0], scales, strides=strides, padding=padding,
                              groups=groups, fused=opts.FusedActivationFunction())
        return self.em.qconv2d(x, weight_oihw, bias, q, self._source(op))

    def _op_CONV_2D(self, op):
        weight, scales, bias = self._int8_weight(op)
        weight = weight.transpose(0, 3, 1, 2)
        x_channels = self.em.shape(self._value(op.Inputs(0)))[1]
        return self._qconv(op, weight, scales, bias, x_channels // weight.shape[1],
                           _options(op, tflite.Conv2DOptions))

    def _op_DEPTHWISE_CONV_2D(self, op):
        weight, scales, bias = self._int8_weight(op)
        weight = weight.transpose(3, 0, 1, 2)
        groups = self.em.shape(self._value(op.Inputs(0)))[1]
        return self._qconv(op, weight, scales, bias, groups,
                           _options(op, tflite.DepthwiseConv2DOptions))

    def _op_FULLY_CONNECTED(self, op):
        opts = _options(op, tflite.FullyConnectedOptions)
        weight, scales, bias = self._int8_weight(op)
        x = self._flatten_nhwc(self._value(op.Inputs(0)), weight)
        q = self._layer_quant(op, weight.shape[0], scales, fused=opts.FusedActivationFunction())
        if self.float_classifier and self._feeds_output(op):
            # the paper's float32 classifier: same function, float weights
            sw = np.asarray(q.sw)
            features = self.em.dequantize(x, q.sx, q.zx)
            w_float = weight.astype(np.float64) * sw[:, None]
            b_float = None if bias is None else bias * sw * q.sx
            y = self.em.linear(features, w_float, b_float, self._source(op))
            self.float_values.add(op.Outputs(0))
            return self._activation(y, opts.FusedActivationFunction())
        return self.em.qlinear(x, weight, bias, q, self._source(op))

    def _op_ADD(self, op):
        opts = _options(op, tflite.AddOptions)
        a, b = op.Inputs(0), op.Inputs(1)
        if not (a in self.values and b in self.values):
            self._unsupported("an ADD of a constant (only two activations are supported in int8)")
        out = op.Outputs(0)
        self.quant[out] = self._qparams(out)
        lo, hi = self._clamp(opts.FusedActivationFunction(), out)
        q = QAddParams(*self.quant[a], *self.quant[b], *self.quant[out], lo, hi)
        return self.em.qadd(self.values[a], self.values[b], q)

    def _op_AVERAGE_POOL_2D(self, op):
        x, opts, kernel, strides, padding = self._pool(op)
        out = op.Outputs(0)
        self.quant[out] = self._qparams(out)
        if self.quant[out] != self.quant[op.Inputs(0)]:
            self._unsupported("input and output quantized differently")
        lo, hi = self._clamp(opts.FusedActivationFunction(), out)
        return self.em.qavg_pool(x, QPoolParams(tuple(kernel), tuple(strides), tuple(padding), lo, hi))

    def _same_quant(self, op) -> None:
        self.quant[op.Outputs(0)] = self.quant[op.Inputs(0)]

    def _op_RESHAPE(self, op):
        self._same_quant(op)
        return super()._op_RESHAPE(op)

    def _op_SOFTMAX(self, op):
        if op.Outputs(0) != self.output:
            self._unsupported("an int8 softmax inside the network (only a trailing one is dropped)")
        if op.Inputs(0) in self.float_values:
            self.float_values.add(op.Outputs(0))
        self._same_quant(op)  # dropped: the logits are the model's output
        return self._value(op.Inputs(0))

    def _op_DEQUANTIZE(self, op):
        """The DEQUANTIZE that gives a float output (int8 files with float I/O): the graph's
        output is dequantized anyway (``_result``)."""
        if op.Outputs(0) != self.output or op.Inputs(0) not in self.values:
            self._unsupported("a DEQUANTIZE inside an int8 network (only one at the output is read)")
        self._same_quant(op)
        if op.Inputs(0) in self.float_values:
            self.float_values.add(op.Outputs(0))
        return self._value(op.Inputs(0))

    def _unsupported_int8(self, op):
        self._unsupported("not supported in int8 models yet")

    _op_MAX_POOL_2D = _op_MEAN = _op_PAD = _op_RELU = _op_RELU6 = _unsupported_int8


def int8_input_quantize(model):
    """The operator that quantizes a float input to int8 when it is the file's first, else None."""
    graph = model.Subgraphs(0)
    if graph.InputsLength() != 1 or graph.OperatorsLength() == 0:
        return None
    first = graph.Operators(0)
    code = model.OperatorCodes(first.OpcodeIndex())
    if (max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != BuiltinOperator.QUANTIZE
            or first.InputsLength() != 1 or first.OutputsLength() != 1
            or first.Inputs(0) != graph.Inputs(0)
            or graph.Tensors(first.Outputs(0)).Type() != TensorType.INT8):
        return None
    return first

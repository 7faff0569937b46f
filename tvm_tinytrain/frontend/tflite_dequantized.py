"""int8 TFLite → its float twin: the int8 network without rounding.

The graph is the float reader's (:class:`_TfliteReader`, whose ``_const`` dequantizes
every quantized constant); the activation bounds come from the file's quantization.
An int8 weight ``q`` with per-channel scales ``s`` along the file's quantized dimension becomes
``s · (q − zero)``, an int32 bias ``s · q``; tensors without quantization (shapes,
paddings, axes) are read as they are. Each layer's output is clipped to the range
its int8 tensor can hold, ``s · ([−128, 127] − zero)``, intersected with its fused
activation, as the int8 kernels clamp (a ReLU6 the converter folded into an
output range stays a ReLU6). The classifier that gives the logits is not
clipped: it is float, as ``load_model``'s default int8 graph makes it.

The model takes the float input the int8 file's input quantizes (``[0, 1]``
images for VWW) and returns float logits: what int8 training approximates,
trained in float as the reference for int8 training from the same weights.

    conv 3x3, int8 out (s 0.02, zero −128), fused RELU   →   clip(conv(x, s_w·q), 0.0, 5.1)
"""

from __future__ import annotations

import numpy as np
from tflite.TensorType import TensorType

from .emitter import Value
from .tflite_int8 import ACTIVATIONS, int8_input_quantize
from .tflite_reader import _TfliteReader


class DequantizedTfliteReader(_TfliteReader):
    VALUE_TYPE = TensorType.INT8  # the file's activations; the graph built is float

    def _input(self):
        if int8_input_quantize(self.model) is None:
            return super()._input()
        self.VALUE_TYPE = TensorType.FLOAT32  # a file that quantizes its float input itself
        try:
            return super()._input()
        finally:
            self.VALUE_TYPE = TensorType.INT8

    def _op_QUANTIZE(self, op):
        """The file's quantization of its float input, without rounding: the range int8 holds."""
        return self._int8_range(self._value(op.Inputs(0)), op.Outputs(0))

    def _op_DEQUANTIZE(self, op):
        if op.Outputs(0) != self.output:
            self._unsupported("a DEQUANTIZE inside an int8 network (only one at the output is read)")
        return self._value(op.Inputs(0))

    def _int8_range(self, x: Value, index: int, lo: float = -np.inf, hi: float = np.inf) -> Value:
        scale, zero = (float(v[0]) for v in self._quantization(index)[:2])
        return self.em.clip(x, max(lo, scale * (-128 - zero)), min(hi, scale * (127 - zero)))

    def _activation(self, x: Value, fused: int) -> Value:
        out = self.op.Outputs(0)
        quant = self._quantization(out)
        if fused not in ACTIVATIONS or quant is None or self._feeds_output(self.op):
            return super()._activation(x, fused)
        lo, hi = ACTIVATIONS[fused] or (-np.inf, None)
        return self._int8_range(x, out, lo, np.inf if hi is None else hi)

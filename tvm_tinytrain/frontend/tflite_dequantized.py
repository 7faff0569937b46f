"""int8 TFLite → its float twin: the int8 network without rounding.

The graph is the float reader's (:class:`_TfliteReader`); the constants and the
activation bounds come from the file's quantization. An int8 weight ``q`` with
per-channel scales ``s`` along the file's quantized dimension becomes
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
from .tflite_int8 import ACTIVATIONS
from .tflite_reader import _TfliteReader


class DequantizedTfliteReader(_TfliteReader):
    VALUE_TYPE = TensorType.INT8  # the file's activations; the graph built is float

    def _const(self, index: int, what: str) -> np.ndarray:
        array = super()._const(index, what)
        quant = self._quantization(index)
        if self._tensor(index).Type() not in (TensorType.INT8, TensorType.INT32) or quant is None:
            return array
        scale, zero, axis = quant
        if scale.size > 1:  # per channel, along the quantized dimension
            shape = [1] * array.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return (array.astype(np.float64) - zero) * scale

    def _activation(self, x: Value, fused: int) -> Value:
        out = self.op.Outputs(0)
        quant = self._quantization(out)
        if fused not in ACTIVATIONS or quant is None or self._feeds_output(self.op):
            return super()._activation(x, fused)
        scale, zero = float(quant[0][0]), float(quant[1][0])
        lo, hi = ACTIVATIONS[fused] or (-np.inf, None)
        hi = np.inf if hi is None else hi
        return self.em.clip(x, max(lo, scale * (-128 - zero)), min(hi, scale * (127 - zero)))

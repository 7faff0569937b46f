"""Edits of a TFLite file's constant tensors that leave every other byte where it was.

A TFLite file is one flatbuffer; its constants sit in ``buffers``, their scales in each tensor's
``QuantizationParameters``. Two edits are enough to write learned parameters back:

1. new values for a tensor of the same shape and type: its buffer's bytes are overwritten in place
   (same size, so no offset anywhere changes);
2. new quantization (scales, zero points, quantized dimension): overwritten in place when the
   vectors keep their length; otherwise a new ``QuantizationParameters`` table is appended at the
   end of the file and the tensor's ``quantization`` field re-pointed to it (flatbuffer offsets
   are relative and unsigned, so a table after its referrer is valid; the old one stays as
   unreferenced bytes).

Operators, metadata, signature defs and every other buffer are the source's bytes. Not handled:
a buffer two tensors share (an edit would change both; refused), a tensor without a
``quantization`` field that needs one (refused).
"""

from __future__ import annotations

import importlib
import struct

import flatbuffers
import numpy as np
import tflite
from tflite.TensorType import TensorType

from .errors import TinyTrainError

_qp = importlib.import_module("tflite.QuantizationParameters")  # the module: its builder functions

NUMPY_TYPES = {TensorType.FLOAT32: np.float32, TensorType.FLOAT16: np.float16, TensorType.INT32: np.int32,
               TensorType.INT8: np.int8, TensorType.INT64: np.int64, TensorType.UINT8: np.uint8}
_QUANT_FIELD = 12  # Tensor.quantization's vtable offset (schema.fbs slot 4)
_SCALE_FIELD, _ZERO_FIELD, _DIM_FIELD = 8, 10, 16  # QuantizationParameters' scale, zero_point, dim


class TfliteFile:
    """A TFLite model's bytes, readable through ``tflite`` and editable (see the module docstring)."""

    def __init__(self, data: bytes):
        self.data = bytearray(data)
        self.model = tflite.Model.GetRootAsModel(self.data, 0)
        self.graph = self.model.Subgraphs(0)

    def tensor(self, index: int):
        return self.graph.Tensors(index)

    def name(self, index: int) -> str:
        return (self.tensor(index).Name() or b"").decode("utf-8", "replace")

    def dtype(self, index: int) -> np.dtype:
        return np.dtype(NUMPY_TYPES[self.tensor(index).Type()])

    def shape(self, index: int) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor(index).ShapeAsNumpy()) if self.tensor(index).ShapeLength() \
            else ()

    def _span(self, index: int) -> tuple[int, int]:
        """(start, length) of a constant tensor's bytes in the file."""
        buf = self.model.Buffers(self.tensor(index).Buffer())
        if buf.Offset() > 1:  # a large model's data after the flatbuffer
            return int(buf.Offset()), int(buf.Size())
        o = buf._tab.Offset(4)
        if o == 0:
            return 0, 0
        return buf._tab.Vector(o), buf._tab.VectorLen(o)

    def values(self, index: int) -> np.ndarray:
        start, length = self._span(index)
        raw = bytes(self.data[start:start + length])
        return np.frombuffer(raw, self.dtype(index)).reshape(self.shape(index))

    def quantization(self, index: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(scales, zero points, quantized dimension), or None when the tensor has no scales."""
        q = self.tensor(index).Quantization()
        if q is None or q.ScaleLength() == 0:
            return None
        zero = q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength() else np.zeros(1, np.int64)
        return q.ScaleAsNumpy().astype(np.float64), zero, int(q.QuantizedDimension())

    def shared_buffer(self, index: int) -> bool:
        buffer = self.tensor(index).Buffer()
        return sum(self.graph.Tensors(i).Buffer() == buffer for i in range(self.graph.TensorsLength())) > 1

    # ---- edits -----------------------------------------------------------------------------
    def set_values(self, index: int, array: np.ndarray) -> None:
        """Overwrite a constant tensor's bytes with ``array`` (same shape, cast to its type)."""
        if self.shared_buffer(index):
            raise TinyTrainError(f"tensor {self.name(index)} shares its buffer with another tensor; "
                                 "writing it would change both")
        raw = np.ascontiguousarray(array, self.dtype(index)).reshape(self.shape(index)).tobytes()
        start, length = self._span(index)
        if length != len(raw):
            raise TinyTrainError(f"tensor {self.name(index)} holds {length} bytes, the new values "
                                 f"{len(raw)}; the file does not match its metadata")
        self.data[start:start + length] = raw

    def set_quantization(self, index: int, scales: np.ndarray, zeros: np.ndarray, dim: int) -> None:
        """New scales / zero points / quantized dimension for a tensor (in place when they fit)."""
        scales = np.asarray(scales, np.float32).reshape(-1)
        zeros = np.broadcast_to(np.asarray(zeros, np.int64).reshape(-1), scales.shape)
        tensor = self.tensor(index)
        q = tensor.Quantization()
        if q is None:
            raise TinyTrainError(f"tensor {self.name(index)} has no quantization to rewrite")
        fits = (q.ScaleLength() == scales.size and q.ZeroPointLength() == scales.size
                and (q._tab.Offset(_DIM_FIELD) != 0 or dim == 0))
        if fits:
            self._overwrite(q, _SCALE_FIELD, scales.tobytes())
            self._overwrite(q, _ZERO_FIELD, zeros.astype(np.int64).tobytes())
            if q._tab.Offset(_DIM_FIELD):
                struct.pack_into("<i", self.data, q._tab.Pos + q._tab.Offset(_DIM_FIELD), dim)
            return
        table = self._append(_quantization_table(scales, zeros, dim))
        field = tensor._tab.Pos + tensor._tab.Offset(_QUANT_FIELD)
        struct.pack_into("<I", self.data, field, table - field)
        self.model = tflite.Model.GetRootAsModel(self.data, 0)
        self.graph = self.model.Subgraphs(0)

    # ---- what export_tuned writes through (the same as onnx_patch.OnnxFile's) ----------------
    def to_bytes(self) -> bytes:
        return bytes(self.data)

    def binding_quantization(self, binding: dict):
        return self.quantization(binding["ref"])

    def set_binding_quantization(self, binding: dict, scales, zeros, dim: int) -> None:
        self.set_quantization(binding["ref"], scales, zeros, dim)

    def activations(self, layer: dict):
        """(input quantization, output quantization) of an int8 layer, or None when it is not one."""
        op = self.graph.Operators(layer["op"])
        x, y = self.quantization(op.Inputs(0)), self.quantization(op.Outputs(0))
        if x is None or y is None or self.dtype(op.Outputs(0)) != np.int8:
            return None
        return x, y

    def output_name(self, layer: dict) -> str:
        return self.name(self.graph.Operators(layer["op"]).Outputs(0))

    def set_output_quantization(self, layer: dict, scale: float, zero: int) -> None:
        out = self.graph.Operators(layer["op"]).Outputs(0)
        self.set_quantization(out, [scale], [zero], self.quantization(out)[2])

    def layer_inputs(self, layer: dict, samples: tuple) -> np.ndarray:
        """The real values entering the layer on each sample (LiteRT's reference kernels)."""
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise TinyTrainError("samples= runs the model in LiteRT: pip install ai-edge-litert "
                                 "(tvm-tinytrain[verify])") from None
        xs, input_quant = samples
        index = self.graph.Operators(layer["op"]).Inputs(0)
        interp = Interpreter(model_content=self.to_bytes(), experimental_preserve_all_tensors=True,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
        interp.allocate_tensors()
        spec = interp.get_input_details()[0]
        out = []
        for x in xs:
            x = np.asarray(x)
            if spec["dtype"] == np.float32 and x.dtype.kind in "iu" and input_quant:
                x = (x.astype(np.float32) - input_quant[1]) * np.float32(input_quant[0])
            interp.set_tensor(spec["index"], x.reshape(spec["shape"]).astype(spec["dtype"]))
            interp.invoke()
            out.append(interp.get_tensor(index).copy())
        values = np.stack(out).astype(np.float64)
        quant = self.quantization(index)
        return values if quant is None else (values - quant[1][0]) * quant[0][0]

    def _overwrite(self, q, field: int, raw: bytes) -> None:
        start = q._tab.Vector(q._tab.Offset(field))
        self.data[start:start + len(raw)] = raw

    def _append(self, blob: bytes) -> int:
        """Append a finished flatbuffer, 16-byte aligned; the absolute position of its root table."""
        self.data += b"\0" * (-len(self.data) % 16)
        base = len(self.data)
        self.data += blob
        return base + struct.unpack_from("<I", blob, 0)[0]


def _quantization_table(scales: np.ndarray, zeros: np.ndarray, dim: int) -> bytes:
    b = flatbuffers.Builder(64 + 12 * scales.size)
    _qp.QuantizationParametersStartScaleVector(b, scales.size)
    for v in reversed(scales.tolist()):
        b.PrependFloat32(v)
    scale = b.EndVector()
    _qp.QuantizationParametersStartZeroPointVector(b, zeros.size)
    for v in reversed(zeros.tolist()):
        b.PrependInt64(int(v))
    zero = b.EndVector()
    _qp.QuantizationParametersStart(b)
    _qp.QuantizationParametersAddScale(b, scale)
    _qp.QuantizationParametersAddZeroPoint(b, zero)
    _qp.QuantizationParametersAddQuantizedDimension(b, dim)
    b.Finish(_qp.QuantizationParametersEnd(b))
    return bytes(b.Output())

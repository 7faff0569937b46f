"""Writes TFLite files: the flatbuffer of TFLite's schema (``schema.fbs``, version 3), built
field by field. The tests make the files converters make (float16 weights behind a DEQUANTIZE,
per-channel weight-only int8) and the ones they never make (a NaN weight, a zero scale, a stride
of 0), and check them against LiteRT; ``tvm_tinytrain.ptq`` writes its int8 models with it.

    tensors = [Tensor("x", (1, 4), FLOAT32), Tensor("w", (2, 4), INT8, data, scale=[.1, .2]), ...]
    ops = [Op(FULLY_CONNECTED, [0, 1, 2], [3], FC_OPTIONS, [(0, "int8", 1)])]   # fused RELU
    data = write_model(tensors, ops, inputs=[0], outputs=[3])

Field slots follow schema.fbs; only the fields a file needs are written (the rest read as their
schema defaults: dilations 1, no quantized bias type). ``conv_options`` and its siblings give an
operator's options as (slot, kind, value) triples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import flatbuffers
import numpy as np
from tflite.BuiltinOperator import BuiltinOperator
from tflite.BuiltinOptions import BuiltinOptions
from tflite.TensorType import TensorType

FLOAT32, FLOAT16, INT32, INT8 = TensorType.FLOAT32, TensorType.FLOAT16, TensorType.INT32, TensorType.INT8
FULLY_CONNECTED, CONV_2D, DEQUANTIZE = (BuiltinOperator.FULLY_CONNECTED, BuiltinOperator.CONV_2D,
                                        BuiltinOperator.DEQUANTIZE)
DEPTHWISE_CONV_2D, AVERAGE_POOL_2D, RESHAPE = (BuiltinOperator.DEPTHWISE_CONV_2D,
                                               BuiltinOperator.AVERAGE_POOL_2D, BuiltinOperator.RESHAPE)
FC_OPTIONS, CONV_OPTIONS = BuiltinOptions.FullyConnectedOptions, BuiltinOptions.Conv2DOptions
DEPTHWISE_OPTIONS, POOL_OPTIONS = BuiltinOptions.DepthwiseConv2DOptions, BuiltinOptions.Pool2DOptions
SAME, VALID = 0, 1  # Padding
NO_ACTIVATION, RELU, RELU6 = 0, 1, 3  # ActivationFunctionType


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: int
    data: np.ndarray | None = None  # a constant's values, stored as they are
    scale: list[float] | None = None
    zero: list[int] | None = None
    axis: int = 0  # the quantized dimension of per-channel scales


@dataclass
class Op:
    code: int
    inputs: list[int]
    outputs: list[int]
    options_type: int = 0
    options: list[tuple[int, str, int]] = field(default_factory=list)  # (slot, "int8"|"int32", value)


def conv_options(stride: tuple[int, int], fused: int, padding: int = SAME) -> list[tuple[int, str, int]]:
    """Conv2DOptions: padding, stride_w, stride_h, fused_activation_function."""
    return [(0, "int8", padding), (1, "int32", stride[1]), (2, "int32", stride[0]), (3, "int8", fused)]


def depthwise_options(stride: tuple[int, int], fused: int, padding: int = SAME) -> list[tuple[int, str, int]]:
    """DepthwiseConv2DOptions: padding, stride_w, stride_h, depth_multiplier 1, fused activation."""
    return [(0, "int8", padding), (1, "int32", stride[1]), (2, "int32", stride[0]), (3, "int32", 1),
            (4, "int8", fused)]


def pool_options(window: tuple[int, int], stride: tuple[int, int], fused: int = NO_ACTIVATION,
                 padding: int = VALID) -> list[tuple[int, str, int]]:
    """Pool2DOptions: padding, stride_w, stride_h, filter_width, filter_height, fused activation."""
    return [(0, "int8", padding), (1, "int32", stride[1]), (2, "int32", stride[0]), (3, "int32", window[1]),
            (4, "int32", window[0]), (5, "int8", fused)]


def fc_options(fused: int = NO_ACTIVATION) -> list[tuple[int, str, int]]:
    """FullyConnectedOptions: fused_activation_function (default weights format, flattened output)."""
    return [(0, "int8", fused)]


def _vector(b: flatbuffers.Builder, values, kind: str) -> int:
    values = list(values)
    size = {"int32": 4, "int64": 8, "float32": 4, "offset": 4}[kind]
    b.StartVector(size, len(values), size)
    for v in reversed(values):
        {"int32": b.PrependInt32, "int64": b.PrependInt64, "float32": b.PrependFloat32,
         "offset": b.PrependUOffsetTRelative}[kind](v)
    return b.EndVector()


def _bytes(b: flatbuffers.Builder, data: bytes) -> int:
    b.StartVector(1, len(data), 16)  # buffers are 16-byte aligned, as the converter writes them
    b.head -= len(data)
    b.Bytes[b.head:b.head + len(data)] = data
    return b.EndVector()


def _table(b: flatbuffers.Builder, fields: list[tuple[int, str, int]], count: int) -> int:
    b.StartObject(count)
    for slot, kind, value in fields:
        {"int8": b.PrependInt8Slot, "uint8": b.PrependUint8Slot, "int32": b.PrependInt32Slot,
         "uint32": b.PrependUint32Slot}.get(kind, b.PrependUOffsetTRelativeSlot)(slot, value, None)
    return b.EndObject()


def write_model(tensors: list[Tensor], ops: list[Op], inputs: list[int], outputs: list[int]) -> bytes:
    b = flatbuffers.Builder(1024)
    buffers = [_table(b, [], 1)]  # buffer 0: empty, by convention
    tensor_tables = []
    for t in tensors:
        buffer = 0
        if t.data is not None:
            data = _bytes(b, np.ascontiguousarray(t.data).tobytes())
            buffers.append(_table(b, [(0, "offset", data)], 1))
            buffer = len(buffers) - 1
        quant = None
        if t.scale is not None:
            scale = _vector(b, t.scale, "float32")
            zero = _vector(b, t.zero if t.zero is not None else [0] * len(t.scale), "int64")
            quant = _table(b, [(2, "offset", scale), (3, "offset", zero), (6, "int32", t.axis)], 7)
        name, shape = b.CreateString(t.name), _vector(b, t.shape, "int32")
        fields = [(0, "offset", shape), (1, "int8", t.type), (2, "uint32", buffer), (3, "offset", name)]
        tensor_tables.append(_table(b, fields + ([(4, "offset", quant)] if quant else []), 5))
    codes = sorted({op.code for op in ops})
    code_tables = [_table(b, [(0, "int8", min(c, 127)), (2, "int32", 1), (3, "int32", c)], 4)
                   for c in codes]
    op_tables = []
    for op in ops:
        fields = [(0, "uint32", codes.index(op.code)), (1, "offset", _vector(b, op.inputs, "int32")),
                  (2, "offset", _vector(b, op.outputs, "int32"))]
        if op.options_type:
            options = _table(b, op.options, 8)
            fields += [(3, "uint8", op.options_type), (4, "offset", options)]
        op_tables.append(_table(b, fields, 5))
    subgraph = _table(b, [(0, "offset", _vector(b, tensor_tables, "offset")),
                          (1, "offset", _vector(b, inputs, "int32")),
                          (2, "offset", _vector(b, outputs, "int32")),
                          (3, "offset", _vector(b, op_tables, "offset"))], 5)
    model = _table(b, [(0, "uint32", 3), (1, "offset", _vector(b, code_tables, "offset")),
                       (2, "offset", _vector(b, [subgraph], "offset")),
                       (4, "offset", _vector(b, buffers, "offset"))], 5)
    b.Finish(model, file_identifier=b"TFL3")
    return bytes(b.Output())

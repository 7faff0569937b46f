"""ONNX ops on values known at import, evaluated in numpy (constant folding).

Exporters write constants and shape arithmetic into the graph: a literal becomes a
``Constant`` node, a shared initializer an ``Identity``, and ``x.view(x.size(0), -1)``
becomes ``Shape → Gather → Unsqueeze → Concat → Reshape``. With static shapes (the
readers bind a dynamic batch to 1) every such value is known at import. The readers
evaluate these nodes here as they meet them, so the graph they build holds only the
ops that compute on the input:

    FOLDERS[op](node, inputs, attrs, opset) -> [outputs]      numpy in, numpy out

``inputs`` are the node's inputs (None for an absent optional one); a Shape or Size
node reads only its input's shape, so the reader passes it a stand-in of that shape
for an activation (``shape_of``). A folder raises :class:`FoldError` where the node
asks for something impossible (an index out of range, a reshape that changes the
size); the reader reports it as a ModelFormatError naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

SHAPE_READERS = {"Shape", "Size"}  # folded when their input's shape is known, not its values


class FoldError(Exception):
    """A node whose constant inputs or attributes make no sense; the message says why."""


def shape_of(shape: tuple[int, ...]) -> np.ndarray:
    """A stand-in for an activation of this shape: right shape, no memory (one float, broadcast)."""
    return np.broadcast_to(np.zeros((), np.float32), shape)


def _axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= int(axis) < rank:
        raise FoldError(f"{what} {axis} is out of range for rank {rank}")
    return int(axis) % rank


def _axes(node, inputs, attrs, index: int, opset_moved: int, opset: int) -> list[int] | None:
    """``axes``: an attribute before ``opset_moved``, the input ``index`` from then on."""
    if opset < opset_moved:
        return list(attrs["axes"]) if "axes" in attrs else None
    if len(inputs) > index and inputs[index] is not None:
        return [int(v) for v in np.asarray(inputs[index]).reshape(-1)]
    return list(attrs["axes"]) if "axes" in attrs else None


def reshape_target(shape: tuple[int, ...], target, allowzero: bool = False) -> tuple[int, ...]:
    """ONNX Reshape's output shape: 0 copies the input's dim (unless ``allowzero``), one -1 is inferred."""
    target = [int(v) for v in np.asarray(target).reshape(-1)]
    out = []
    for i, v in enumerate(target):
        if v == 0 and not allowzero:
            if i >= len(shape):
                raise FoldError(f"shape {target} copies dim {i} (0) of an input of rank {len(shape)}")
            v = shape[i]
        elif v < -1:
            raise FoldError(f"shape {target} holds {v}; dims are positive, 0 (copy) or -1 (infer)")
        out.append(v)
    size = int(np.prod(shape, dtype=np.int64))
    if out.count(-1) > 1:
        raise FoldError(f"shape {target} infers more than one dim (-1)")
    if -1 in out:
        known = int(np.prod([v for v in out if v != -1], dtype=np.int64))
        if known == 0 or size % known:
            raise FoldError(f"cannot reshape {tuple(shape)} ({size} values) to {target}")
        out[out.index(-1)] = size // known
    if int(np.prod(out, dtype=np.int64)) != size or 0 in out:
        raise FoldError(f"cannot reshape {tuple(shape)} ({size} values) to {target}")
    return tuple(out)


# ---- folders: one per op ----------------------------------------------------
def _constant(node, inputs, attrs, opset):
    if "value" in attrs:
        return [numpy_helper.to_array(attrs["value"])]
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        if name in attrs:
            return [np.asarray(attrs[name], dtype)]
    raise FoldError(f"a Constant holding {', '.join(attrs) or 'nothing'}; only dense numeric values")


def _identity(node, inputs, attrs, opset):
    return [inputs[0]]


def _shape(node, inputs, attrs, opset):
    dims = np.asarray(inputs[0].shape, np.int64)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return [dims[start:end]]


def _size(node, inputs, attrs, opset):
    return [np.asarray(inputs[0].size, np.int64)]


def _gather(node, inputs, attrs, opset):
    data, indices = inputs[0], np.asarray(inputs[1]).astype(np.int64)
    axis = _axis(attrs.get("axis", 0), data.ndim)
    n = data.shape[axis]
    if indices.size and (indices.min() < -n or indices.max() >= n):
        raise FoldError(f"indices {indices.tolist()} are out of range for a dim of {n}")
    return [np.take(data, np.where(indices < 0, indices + n, indices), axis=axis)]


def _unsqueeze(node, inputs, attrs, opset):
    axes = _axes(node, inputs, attrs, 1, 13, opset)
    if not axes:
        raise FoldError("Unsqueeze without axes")
    data = inputs[0]
    rank = data.ndim + len(axes)
    axes = sorted(_axis(a, rank) for a in axes)
    if len(set(axes)) != len(axes):
        raise FoldError(f"repeated axes {axes}")
    return [np.asarray(data).reshape(unsqueezed_shape(data.shape, axes))]


def unsqueezed_shape(shape: tuple[int, ...], axes: list[int]) -> tuple[int, ...]:
    out, it = [], iter(shape)
    for i in range(len(shape) + len(axes)):
        out.append(1 if i in axes else next(it))
    return tuple(out)


def squeezed_shape(shape: tuple[int, ...], axes: list[int] | None) -> tuple[int, ...]:
    if axes is None:
        return tuple(d for d in shape if d != 1)
    axes = {_axis(a, len(shape)) for a in axes}
    if any(shape[a] != 1 for a in axes):
        raise FoldError(f"squeezes axes {sorted(axes)} of shape {tuple(shape)}; only dims of 1 go")
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _squeeze(node, inputs, attrs, opset):
    shape = squeezed_shape(inputs[0].shape, _axes(node, inputs, attrs, 1, 13, opset))
    return [np.asarray(inputs[0]).reshape(shape)]


def _concat(node, inputs, attrs, opset):
    arrays = [np.asarray(a) for a in inputs if a is not None]
    axis = _axis(attrs.get("axis", 0), arrays[0].ndim)
    return [np.concatenate(arrays, axis=axis)]


def _cast(node, inputs, attrs, opset):
    return [np.asarray(inputs[0]).astype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))]


def _slice(node, inputs, attrs, opset):
    data = np.asarray(inputs[0])
    if opset < 10:
        starts, ends = attrs["starts"], attrs["ends"]
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = inputs[1], inputs[2]
        axes = inputs[3] if len(inputs) > 3 else None
        steps = inputs[4] if len(inputs) > 4 else None
    starts = [int(v) for v in np.asarray(starts).reshape(-1)]
    ends = [int(v) for v in np.asarray(ends).reshape(-1)]
    axes = list(range(len(starts))) if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise FoldError("starts, ends, axes and steps of different lengths")
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step == 0:
            raise FoldError("a step of 0")
        index[_axis(axis, data.ndim)] = slice(start, end, step)
    return [data[tuple(index)]]


def _reshape(node, inputs, attrs, opset):
    data = np.asarray(inputs[0])
    return [data.reshape(reshape_target(data.shape, inputs[1], bool(attrs.get("allowzero", 0))))]


def _flatten(node, inputs, attrs, opset):
    data = np.asarray(inputs[0])
    axis = _axis(attrs.get("axis", 1), data.ndim + 1)
    return [data.reshape(int(np.prod(data.shape[:axis])), int(np.prod(data.shape[axis:])))]


def _transpose(node, inputs, attrs, opset):
    data = np.asarray(inputs[0])
    perm = attrs.get("perm", list(reversed(range(data.ndim))))
    if sorted(int(p) for p in perm) != list(range(data.ndim)):
        raise FoldError(f"perm {list(perm)} is not a permutation of {data.ndim} axes")
    return [np.transpose(data, perm)]


def _constant_of_shape(node, inputs, attrs, opset):
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    shape = [int(v) for v in np.asarray(inputs[0]).reshape(-1)]
    if any(v < 0 for v in shape):
        raise FoldError(f"a negative shape {shape}")
    return [np.full(shape, value.reshape(-1)[0], value.dtype)]


def _arithmetic(fn):
    def fold(node, inputs, attrs, opset):
        a, b = np.asarray(inputs[0]), np.asarray(inputs[1])
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise FoldError(f"operands of shapes {a.shape} and {b.shape} do not broadcast") from None
        return [np.broadcast_to(fn(a, b), shape).astype(np.result_type(a, b))]
    return fold


def _divide(a, b):
    if np.issubdtype(a.dtype, np.integer):
        if np.any(b == 0):
            raise FoldError("an integer division by zero")
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer Div truncates
    return a / b


FOLDERS = {
    "Add": _arithmetic(np.add), "Cast": _cast, "Concat": _concat, "Constant": _constant,
    "ConstantOfShape": _constant_of_shape, "Div": _arithmetic(_divide), "Flatten": _flatten,
    "Gather": _gather, "Identity": _identity, "Mul": _arithmetic(np.multiply), "Reshape": _reshape,
    "Shape": _shape, "Size": _size, "Slice": _slice, "Squeeze": _squeeze, "Sub": _arithmetic(np.subtract),
    "Transpose": _transpose, "Unsqueeze": _unsqueeze,
}


def opset_version(model: onnx.ModelProto) -> int:
    """The default ONNX domain's opset (the one the ops here are read by)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1

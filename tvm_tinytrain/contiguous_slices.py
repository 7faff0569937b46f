"""Kernels that only copy a contiguous run of one input: a ``split`` along the outermost non-unit
axis, a ``strided_slice`` of leading rows, a ``reshape``. Their outputs can be views of the input
(no copy, no bytes of their own): the planner places them inside it (``memory.Buffer.view_of``).

The test is on the TIR itself, not on the op's name: every block of the kernel writes one whole
output, element by element in order, from one input element of the same type, and the input's
flat index minus the output's flat index simplifies to one constant for every element. Then output
element ``i`` is input element ``i + c``: the output is the input's bytes from ``c * itemsize``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, tirx


def _flat_index(indices, shape) -> tirx.PrimExpr:
    flat = tirx.IntImm("int64", 0)
    for index, extent in zip(indices, shape):
        flat = flat * extent + index
    return flat


def _blocks(stmt) -> list[s_tir.SBlockRealize] | None:
    """The block realizations under ``stmt`` (loops and sequences only), or None for anything else."""
    if isinstance(stmt, s_tir.SBlockRealize):
        return [stmt]
    if isinstance(stmt, tirx.For):
        return _blocks(stmt.body)
    if isinstance(stmt, tirx.SeqStmt):
        found = []
        for s in stmt.seq:
            inner = _blocks(s)
            if inner is None:
                return None
            found += inner
        return found
    return None


def _loop_extents(stmt, extents: dict) -> None:
    if isinstance(stmt, tirx.For):
        extents[stmt.loop_var] = stmt.extent
        _loop_extents(stmt.body, extents)
    elif isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            _loop_extents(s, extents)


def _element_offset(realize: s_tir.SBlockRealize, loops: dict, out: tirx.Buffer,
                    source: tirx.Buffer) -> int | None:
    """Input element offset ``c`` when this block is ``out[i] = source[i + c]`` over all of ``out``."""
    block = realize.block
    store = block.body
    if (block.init is not None or len(block.alloc_buffers) or len(block.match_buffers)
            or not isinstance(store, tirx.BufferStore) or not store.buffer.same_as(out)
            or not isinstance(store.value, tvm.ir.TensorLoad) or not store.value.source.same_as(source)
            or not (isinstance(realize.predicate, tirx.IntImm) and int(realize.predicate.value) == 1)):
        return None
    shape = [int(d) for d in out.shape]
    iters = list(block.iter_vars)
    if len(iters) != len(shape) or len(store.indices) != len(shape):
        return None
    analyzer = tvm.sym.Analyzer()
    for it, extent, index, value in zip(iters, shape, store.indices, realize.iter_values):
        # each block axis a spatial loop over the whole of its output axis, stored in order
        if (int(it.iter_type) != 0 or not index.same_as(it.var) or int(it.dom.min) != 0
                or int(it.dom.extent) != extent or not isinstance(value, tirx.Var)
                or int(loops.get(value, -1)) != extent):
            return None
        analyzer.bind(it.var, it.dom.min if extent == 1 else it.dom)  # a unit axis is 0
    if len({v for v in realize.iter_values}) != len(shape):
        return None
    offset = analyzer.simplify(_flat_index(store.value.indices, [int(d) for d in source.shape])
                               - _flat_index(store.indices, shape))
    if not isinstance(offset, tirx.IntImm):
        return None
    c = int(offset.value)
    return c if 0 <= c and c + int(np.prod(shape)) <= int(np.prod([int(d) for d in source.shape])) else None


def contiguous_slices(func: tirx.PrimFunc, num_inputs: int) -> dict[int, tuple[int, int]] | None:
    """``{output index: (input index, byte offset)}`` when every output of ``func`` (its parameters
    after the first ``num_inputs``) is a contiguous run of one input's bytes; else None."""
    scheduled = func.attrs is not None and "tinytrain.scheduled" in func.attrs  # a hand-written kernel
    if not isinstance(func, tirx.PrimFunc) or scheduled:
        return None
    buffers = list(func.params)  # TVM 0.27: the parameters are the buffers
    inputs, outputs = buffers[:num_inputs], buffers[num_inputs:]
    body = func.body
    if not outputs or not isinstance(body, s_tir.SBlockRealize):
        return None
    root = body.block
    if len(root.alloc_buffers) or len(root.match_buffers) or root.init is not None:
        return None
    realizes = _blocks(root.body)
    if realizes is None or len(realizes) != len(outputs):
        return None
    loops: dict = {}
    _loop_extents(root.body, loops)
    slices = {}
    for realize in realizes:
        store = realize.block.body
        if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, tvm.ir.TensorLoad):
            return None
        out = next((i for i, b in enumerate(outputs) if b.same_as(store.buffer)), None)
        src = next((i for i, b in enumerate(inputs) if b.same_as(store.value.source)), None)
        if out is None or src is None or out in slices or outputs[out].dtype != inputs[src].dtype:
            return None
        offset = _element_offset(realize, loops, outputs[out], inputs[src])
        if offset is None:
            return None
        slices[out] = (src, offset * tvm.DataType(str(inputs[src].dtype)).bits // 8)
    return slices

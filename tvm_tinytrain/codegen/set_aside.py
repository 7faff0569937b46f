"""Large stored values set aside while TVM's lowering passes run, then put back unchanged.

TVM's analyser-based passes (HoistIfThenElse, RemoveNoOp, StmtSimplify, LowerIntrin) take
seconds on a kernel that stores a large integer expression of loaded values, such as TFLite's
requantization (selects whose conditions hold 64-bit divisions and more selects): 4 s per int8
conv, 2.4 s per int8 add, for C identical to what the value was. While they run, such a value is
a call of its loads::

    y[o, i] = T.Cast("int8", T.max(T.min(... acc[o, i] ... in2[o] ... in4[o] ..., 127), -128))
    y[o, i] = T.call_pure_extern("int8", "tinytrain_set_aside_0", acc[o, i], in2[o], in4[o])

and the passes rewrite the loads as they rewrite any load (flattened indices, unrolled or
partitioned loop variables, renamed buffers); :meth:`SetAside.put_back` then writes the value
again over the loads the passes left. Only a value whose leaves are all loads and constants is
set aside: one that reads a loop variable could be simplified by the loop's range, and is left
to the passes.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

MIN_NODES = 32  # a value smaller than this (as a tree) costs the passes nothing worth saving

_BINARY = tuple(getattr(tirx, n) for n in (
    "Add", "Sub", "Mul", "Div", "Mod", "Min", "Max", "EQ", "NE", "LT", "LE", "GT", "GE",
    "And", "Or", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "LShift", "RShift"))
_LOAD = tvm.ir.expr.TensorLoad
_CONSTANT = (tirx.IntImm, tirx.FloatImm)
_CALL_PURE_EXTERN = "tirx.call_pure_extern"
PLACEHOLDER = "tinytrain_set_aside_"


class _NotSetAside(Exception):
    """The value holds a node the passes may want to see: a variable (simplified by its loop's
    range), a call, a floor division (LowerIntrin rewrites it by what it can prove), float
    arithmetic (LowerIntrin may fuse a multiply-add)."""


def _children(e) -> tuple:
    if not str(e.ty).startswith(("int", "uint", "bool")):  # float arithmetic: LowerIntrin may fuse it
        raise _NotSetAside
    if isinstance(e, _BINARY):
        return (e.a, e.b)
    if isinstance(e, tirx.Not):
        return (e.a,)
    if isinstance(e, tirx.Cast):
        return (e.value,)
    if isinstance(e, tirx.Select):
        return (e.condition, e.true_value, e.false_value)
    raise _NotSetAside


def _loads(value) -> tuple[int, dict]:
    """(nodes of ``value`` as a tree, {structural key: position} of its distinct loads)."""
    loads: dict = {}
    sizes: dict[int, int] = {}  # by node address: a shared subexpression is sized once

    def size(e) -> int:
        address = e.__chandle__()
        if address not in sizes:
            if isinstance(e, _LOAD):
                loads.setdefault(tvm_ffi.StructuralKey(e), len(loads))
                sizes[address] = 1
            elif isinstance(e, _CONSTANT):
                sizes[address] = 1
            else:
                sizes[address] = 1 + sum(size(c) for c in _children(e))
        return sizes[address]

    return size(value), loads


class SetAside:
    """The values set aside from a module's kernels, by placeholder number."""

    def __init__(self, min_nodes: int = MIN_NODES):
        self.min_nodes = min_nodes
        self.values: list[tuple[list[tirx.Var], tirx.PrimExpr]] = []  # (parameters, value over them)

    def set_aside(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        """``func`` with each large stored value of loads and constants replaced by a placeholder call."""
        def visit(store):
            try:
                nodes, loads = _loads(store.value)
            except _NotSetAside:
                return store
            if nodes < self.min_nodes:
                return store
            order: list = [None] * len(loads)
            params: list = [None] * len(loads)

            def to_param(load):
                i = loads[tvm_ffi.StructuralKey(load)]
                if params[i] is None:
                    order[i] = load
                    params[i] = tirx.Var(f"load{i}", load.ty)
                return params[i]

            value = tvm_ffi.structural_map(store.value, [(_LOAD, to_param)], order="pre")
            self.values.append((params, value))
            call = tirx.call_pure_extern(store.value.ty, f"{PLACEHOLDER}{len(self.values) - 1}", *order)
            return tirx.BufferStore(store.buffer, call, store.indices)

        return func.with_body(tvm_ffi.structural_map(func.body, [(tirx.BufferStore, visit)]))

    def put_back(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        """``func`` with each placeholder call replaced by its value, over the call's loads."""
        def visit(call):
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == _CALL_PURE_EXTERN):
                return call
            name = call.args[0].value
            if not name.startswith(PLACEHOLDER):
                return call
            params, value = self.values[int(name[len(PLACEHOLDER):])]
            loads = {p.__chandle__(): load for p, load in zip(params, call.args[1:], strict=True)}
            for p, load in zip(params, call.args[1:]):
                if str(p.ty) != str(load.ty):  # no pass we run retypes a loaded value
                    raise TypeError(f"{name}: a pass changed load {load} from {p.ty} to {load.ty}")
            return tvm_ffi.structural_map(value, [(tirx.Var, lambda v: loads.get(v.__chandle__(), v))])

        return func.with_body(tvm_ffi.structural_map(func.body, [(tvm.ir.Call, visit)]))

    def module_pass(self, what: str) -> tvm.transform.Pass:
        """``set_aside`` or ``put_back`` on every PrimFunc of a module, as a pass."""
        method = getattr(self, what)

        @tvm.transform.module_pass(opt_level=0, name=f"tinytrain.{what}")
        def run(mod: tvm.IRModule, ctx) -> tvm.IRModule:
            return tvm.IRModule({gv: method(f) if isinstance(f, tirx.PrimFunc) else f
                                 for gv, f in mod.functions.items()}, attrs=mod.attrs)

        return run


LLVM_PIPELINE = "tinytrain_set_aside"


def _set_aside_around_default() -> tuple:
    """TVM's default TIR pipeline (``tvm.tirx.build``'s three parts) with the large values set aside
    before it and put back after its host finalization (LowerTVMBuiltin, LowerIntrin): one
    :class:`SetAside` per build, since ``tvm.tirx.build`` asks for the pipeline once per build."""
    aside = SetAside()
    lower, finalize_host, finalize_device = tirx.get_tir_pipeline("s_tir")

    def host() -> tvm.transform.Pass:
        return tvm.transform.Sequential([finalize_host(), aside.module_pass("put_back")])

    return tvm.transform.Sequential([aside.module_pass("set_aside"), lower]), host, finalize_device


def tir_pipeline() -> str:
    """The name of TVM's default TIR pipeline with the set-aside around it, for
    ``tvm.compile(..., tir_pipeline=...)`` (registered on first use)."""
    tirx.compilation_pipeline.register_tir_pipeline(LLVM_PIPELINE, _set_aside_around_default)
    return LLVM_PIPELINE

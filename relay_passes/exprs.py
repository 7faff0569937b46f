"""Small readers of Relax IR that the passes and the lowering share."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

_MULTIPLY = tvm.ir.Op.get("relax.multiply")


def use_counts(func: relax.Function) -> dict[relax.Var, int]:
    """How many bindings (and the function's result) read each var of ``func``'s one block."""
    uses: dict[relax.Var, int] = {}
    for b in func.body.blocks[0].bindings:
        for v in relax.analysis.free_vars(b.value):
            uses[v] = uses.get(v, 0) + 1
    for v in relax.analysis.free_vars(func.body.body):
        uses[v] = uses.get(v, 0) + 1
    return uses


def constant_value(const) -> np.ndarray:
    """A Relax constant's data (``GenericConst.value``: a tensor, or a Python number for a scalar)."""
    value = const.value
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def tensor_bytes(ty) -> int:
    """The bytes of a tensor type (static shape); 0 for anything that is not a tensor."""
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(ty, "dtype"):
        return 0
    n = 1
    for d in shape:
        n *= int(d)
    return n * max(tvm.DataType(str(ty.dtype)).bits // 8, 1)


def learning_reach(func: relax.Function, frozen: set) -> set:
    """The parameters of ``func`` (after the input) not in ``frozen``, and every var of its
    one block that depends on them: where gradients flow."""
    learning = {p for p in func.params[1:] if p not in frozen}
    for b in func.body.blocks[0].bindings:
        if any(v in learning for v in relax.analysis.free_vars(b.value)):
            learning.add(b.var)
    return learning


def constant_and_other(call):
    """(constant array, the other operand) of ``multiply(const, v)`` or ``multiply(v, const)``,
    else None."""
    if not (isinstance(call, relax.Call) and call.op == _MULTIPLY):
        return None
    a, b = call.args
    for const, other in ((a, b), (b, a)):
        if isinstance(const, tvm.ir.expr.Constant):
            return np.asarray(constant_value(const), np.float64), other
    return None


def scalar_and_other(call, scalar: relax.Var | None):
    """(``scalar``, the other operand) of ``multiply(scalar, v)`` or ``multiply(v, scalar)``,
    else None: a multiply by a runtime scalar such as the learning rate."""
    if scalar is None or not (isinstance(call, relax.Call) and call.op == _MULTIPLY):
        return None
    a, b = call.args
    for s, other in ((a, b), (b, a)):
        if s.same_as(scalar):
            return s, other
    return None


def with_bindings(mod: tvm.IRModule, func: relax.Function, name: str, bindings: list) -> tvm.IRModule:
    """``mod`` with function ``name`` = ``func`` over new ``bindings`` (one dataflow block),
    normalized, the dead code of the training module removed."""
    body = relax.SeqExpr([relax.DataflowBlock(bindings)], func.body.body)
    mod[name] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
    return relax.transform.DeadCodeElimination([name, "predict"])(relax.transform.Normalize()(mod))

"""PlainTIRCalls: ``call_tir_with_grad`` → ``call_tir`` once nothing is differentiated any more."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class _PlainCalls(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.call_tir_with_grad"):
            return relax.call_tir(call.args[0], call.args[1], call.ty)
        return call

@tvm.transform.module_pass(opt_level=0, name="PlainTIRCalls")
def PlainTIRCalls(mod: tvm.IRModule, ctx) -> tvm.IRModule:
    """``call_tir_with_grad`` → ``call_tir`` (VM codegen knows only the latter).

    Before: ``y = R.call_tir_with_grad(qconv, (x, w, b, m, s), out_ty, te_grad_name=...)``.
    After: ``y = R.call_tir(qconv, (x, w, b, m, s), out_ty)``. Run after Gradient.
    """
    out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gv] = _PlainCalls(mod).visit_expr(func)
    return out

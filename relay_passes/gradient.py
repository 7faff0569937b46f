"""BuildGradient: the adjoint of ``train_loss`` for its trainable parameters.

A front for ``relax.transform.Gradient`` that finds the trainable parameters by
the ``tinytrain.trainable`` attribute AppendLoss left, so it composes in a
``Sequential`` (Gradient itself wants the ``Var`` objects).

Before: ``train_loss(x, label, *trainable, *frozen) -> loss``.
After, in addition::

    def train_loss_adjoint(x, label, *trainable, *frozen):
        ...                                  # forward, then backward
        return (loss, (grad_trainable_0, grad_trainable_1, ...))

Gradient differentiates float parameters only. An int8 weight or int32 bias of
a quantized layer is therefore handed to it as a float32 parameter cast back to
its integer type (``w = R.astype(w_f, "int8")``, whose gradient is the identity),
and the cast is taken out of the adjoint again: the adjoint takes the integer
tensor and returns its float32 gradient (with respect to the integer values).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import int8_grads, op_gradients  # noqa: F401  (register the gradients Relax lacks)
from .attrs import attr_names

_ASTYPE = tvm.ir.Op.get("relax.astype")


def is_integer(var: relax.Var) -> bool:
    return str(var.ty.dtype).startswith(("int", "uint"))


@mutator
class _Substitute(PyExprMutator):
    """Replace vars; drop casts that no longer change the type."""

    def __init__(self, mapping: dict):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, var):
        return self.mapping.get(var, var)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call, relax.Call) and call.op == _ASTYPE \
                and str(call.args[0].ty.dtype) == str(call.attrs.dtype):
            return call.args[0]
        return call


def _retyped(func: relax.Function, params: list[relax.Var], mapping: dict,
             casts: dict[relax.Var, str]) -> relax.Function:
    """``func`` over ``params``: each var of ``casts`` first cast to its dtype."""
    bb = relax.BlockBuilder()
    with bb.function("f", params):
        with bb.dataflow():
            subst = dict(mapping)
            for var, dtype in casts.items():
                subst[var] = bb.emit(R.astype(mapping[var], dtype))
            body = _Substitute(subst).visit_expr(func.body)
            for binding in body.blocks[0].bindings:
                bb.emit_normalized(binding)
            out = body.body  # the block's outputs, as they were (a tuple for the adjoint)
            if isinstance(out, relax.DataflowVar):
                out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()["f"].with_attrs(dict(func.attrs))


def _lift(func: relax.Function, count: int) -> relax.Function:
    """Integer trainable parameters → float32 parameters cast to the integer type."""
    params, mapping, casts = list(func.params), {}, {}
    for i in range(2, 2 + count):
        p = params[i]
        if is_integer(p):
            params[i] = relax.Var(p.name, relax.TensorType(p.ty.shape, "float32"))
            mapping[p], casts[p] = params[i], str(p.ty.dtype)
    return _retyped(func, params, mapping, casts) if casts else func


def _lower(func: relax.Function, original: relax.Function) -> relax.Function:
    """The adjoint back over the original (integer) parameters."""
    params, mapping = list(func.params), {}
    for i, (p, orig) in enumerate(zip(func.params, original.params)):
        if str(p.ty.dtype) != str(orig.ty.dtype):
            params[i] = relax.Var(orig.name, orig.ty)
            mapping[p] = params[i]
    return _retyped(func, params, mapping, {}) if mapping else func


@tvm.transform.module_pass(opt_level=0, name="BuildGradient")
class BuildGradient:
    def __init__(self, func: str = "train_loss"):
        self.func = func

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        original = mod[self.func]
        count = len(attr_names(original, "tinytrain.trainable"))
        func = _lift(original, count)
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[self.func] = func
        mod = relax.transform.Gradient(self.func, require_grads=list(func.params[2:2 + count]))(mod)
        adjoint = _lower(mod[self.func + "_adjoint"], original)
        mod[self.func + "_adjoint"] = adjoint.with_attrs(
            {k: original.attrs[k] for k in ("tinytrain.trainable", "tinytrain.loss")}
        )
        mod[self.func] = original
        return mod

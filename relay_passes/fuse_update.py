"""FuseWeightUpdate: an int8 layer's weight gradient summed straight into its update.

With plain SGD the update of an int8 weight needs each gradient element once,
so the gradient is accumulated per weight in a register and applied at once:
the float32 weight gradient (4× the weight, the largest tensor of a sparse
int8 step) never exists. Momentum and Adam keep state from the gradient, so
their updates are left as they are.

Before (QAS on)::

    g = R.call_tir(qconv_weight_grad, (x, g_acc))      # kernel tagged tinytrain_qconv_weight_grad
    gq = R.multiply(g, qas)                             # (O, 1, 1, 1) per-channel factor
    d = R.multiply(learning_rate, gq)                   # the runtime learning-rate scalar
    w_new = R.call_tir(integer_update, (w, d))         # kernel tagged tinytrain_integer_update

After::

    factor = R.multiply(learning_rate, R.const(qas))   # (O,): O multiplies a step
    w_new = R.call_tir(qconv_weight_update, (x, g_acc, w, factor))

An inverted bottleneck's expansion gets its gradient in row chunks
(``int8_grads._chunked_expansion_grad``); each chunk's rows are updated from it
and the rows joined, written over the weight once nothing reads it::

    g = R.concat((R.call_tir(qconv_weight_grad_rows, (x, g_c0)), ...), axis=0)   # g_c0: clamped rows
    ...                                                 # the same multiplies and update
    →
    r0 = R.call_tir(qconv_weight_rows_update, (x, g_c0, w, factor))   # rows 0..c
    ...
    w_new = R.concat((r0, r1, ...), axis=0)
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax import op as R

from .attrs import learning_rate_var
from .exprs import constant_and_other, scalar_and_other, use_counts, with_bindings
from .int8_arith import integer_step
from .int8_grad_kernels import (
    ROWS_WEIGHT_GRAD,
    input_channel_outer,
    is_pointwise,
    pointwise_weight_grad_te,
    qconv_weight_grad_te,
    qlinear_weight_grad_te,
    rows_weight_grad,
)
from .int8_ops import WEIGHT_GRADS, QConvParams, fused_accumulator, kernel_tag, make_kernel

_CONCAT = tvm.ir.Op.get("relax.concat")


def fused_weight_update(kind: str, q: QConvParams, x, g, w, factor, lo: float, hi: float,
                        rounding: str = "stochastic"):
    """``w − factor[o]·∂L/∂w`` back in w's integer type (:func:`integer_step`), the gradient summed into one
    scalar per weight: the weight gradient never exists as a tensor (the paper's in-place
    update). ``kind`` is the weight gradient's tag."""
    if kind == "tinytrain_qconv_weight_grad" and is_pointwise(q, [int(d) for d in w.shape]):
        grad = pointwise_weight_grad_te(q, x, g)
    elif kind == "tinytrain_qconv_weight_grad":
        grad = qconv_weight_grad_te(q, x, g, [int(d) for d in w.shape])
    else:
        grad = qlinear_weight_grad_te(q, x, g)

    def body(*i):
        return integer_step(w[i], factor[i[0]] * grad[i], i, w.shape, lo, hi, rounding)

    return te.compute(w.shape, body, name="y")


def fused_rows_update(q: QConvParams, x, g, w, factor, c0: int, lo: float, hi: float,
                      rounding: str = "stochastic"):
    """Rows ``c0 .. c0 + len(g)`` of :func:`fused_weight_update` for a weight whose gradient
    comes in row chunks (``int8_grad_kernels.rows_weight_grad``): the new rows only."""
    grad = rows_weight_grad(q, x, g)
    shape = [int(d) for d in grad.shape]

    def body(j, *i):
        full = (j + c0, *i)
        return integer_step(w[full], factor[j + c0] * grad[(j, *i)], full, w.shape, lo, hi, rounding)

    return te.compute(shape, body, name="y")


def _update_factor(var, w, factor, lr) -> tuple[list, relax.Expr]:
    """(bindings, the per-output-channel step factor) of an integer update: the constant
    factor, times the runtime learning rate ``lr`` when the step has one."""
    channels = int(w.ty.shape[0])
    const = relax.const(np.broadcast_to(np.asarray(factor, np.float32), (channels,)).copy())
    if lr is None:
        return [], const
    out = relax.DataflowVar(f"{var.name}_factor", relax.TensorType((channels,), "float32"))
    return [relax.VarBinding(out, R.multiply(lr, const))], out


def _update_kwargs(kw) -> tuple:
    """(lo, hi, rounding) of an integer update's kernel tag."""
    return float(kw["lo"]), float(kw["hi"]), str(kw["rounding"])


@tvm.transform.module_pass(opt_level=0, name="FuseWeightUpdate")
class FuseWeightUpdate:
    def __init__(self, func: str = "train_step"):
        self.func = func

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod[self.func]
        bindings = list(func.body.blocks[0].bindings)
        value = {b.var: b.value for b in bindings}
        uses = use_counts(func)

        def tag(v):
            return kernel_tag(mod, v)[0]

        lr_var = learning_rate_var(func)
        fused = {}
        for b in bindings:
            if tag(b.value) != "tinytrain_integer_update":
                continue
            w, step = b.value.args[1]
            factor, lr, chain = np.ones(()), None, step
            while chain in value and uses.get(chain, 0) == 1 and tag(value[chain]) not in WEIGHT_GRADS:
                split = constant_and_other(value[chain])
                if split is not None:
                    factor, chain = factor * split[0], split[1]
                    continue
                split = scalar_and_other(value[chain], lr_var) if lr is None else None
                if split is None:
                    break
                lr, chain = split
            if chain not in value or uses.get(chain, 0) != 1:
                continue
            factor = factor.reshape(-1) if factor.ndim else factor
            kw = kernel_tag(mod, b.value)[1]
            if tag(value[chain]) in WEIGHT_GRADS:
                fused[b.var] = (self._fuse_whole, value[chain], w, factor, lr, kw)
            else:
                chunks = self._row_chunks(mod, value[chain], value, uses)
                if chunks is not None:
                    fused[b.var] = (self._fuse_rows, chunks, w, factor, lr, kw)
        if not fused:
            return mod
        bb = relax.BlockBuilder(mod)
        new_bindings = []
        for b in bindings:
            if b.var in fused:
                emit, grad, *rest = fused[b.var]
                new_bindings += emit(bb, b.var, grad, *rest)
            else:
                new_bindings.append(b)
        return with_bindings(bb.get(), func, self.func, new_bindings)

    @staticmethod
    def _fuse_whole(bb, var, grad, w, factor, lr, kw) -> list:
        """The update from the gradient's inputs, the gradient summed per weight."""
        kind, grad_kw = kernel_tag(bb.get(), grad)
        x, g = grad.args[1]
        q = QConvParams.from_kwargs(grad_kw)
        out, factor = _update_factor(var, w, factor, lr)
        lo, hi, rounding = _update_kwargs(kw)
        pointwise = kind == "tinytrain_qconv_weight_grad" and is_pointwise(q, [int(d) for d in w.ty.shape])
        kernel, out_ty = make_kernel(
            lambda *t: fused_weight_update(kind, q, *t, lo, hi, rounding), [x, g, w, factor],
            input_channel_outer if pointwise else fused_accumulator)
        # element i of the new weight reads element i of the old one only: it may be
        # written over the parameter (the C path's in-place update checks this attribute)
        kernel = kernel.with_attr("tinytrain.elementwise_in", [2])
        gv = bb.add_func(kernel, kind.replace("tinytrain_", "").replace("_grad", "_update"))
        return [*out, relax.VarBinding(var, relax.call_tir(gv, [x, g, w, factor], out_ty))]

    @staticmethod
    def _row_chunks(mod, value, defs, uses):
        """The row-chunk weight-gradient calls a ``concat`` joins, or None."""
        if not (isinstance(value, relax.Call) and value.op == _CONCAT):
            return None
        fields = list(value.args[0].fields) if isinstance(value.args[0], relax.Tuple) else None
        if not fields or any(uses.get(f, 0) != 1 or kernel_tag(mod, defs.get(f))[0] != ROWS_WEIGHT_GRAD
                             for f in fields):
            return None
        return [defs[f] for f in fields]

    @staticmethod
    def _fuse_rows(bb, var, chunks, w, factor, lr, kw) -> list:
        """Each chunk's new rows straight from its gradient, then the rows joined as the
        new weight (written over the old one once nothing reads it)."""
        out, factor = _update_factor(var, w, factor, lr)
        lo, hi, rounding = _update_kwargs(kw)
        rows = []
        for call in chunks:
            _, grad_kw = kernel_tag(bb.get(), call)
            q = QConvParams.from_kwargs(grad_kw)
            c0 = int(grad_kw["c0"])
            x, g = call.args[1]
            args = [x, g, w, factor]
            kernel, out_ty = make_kernel(
                lambda *t, q=q, c0=c0: fused_rows_update(q, *t, c0, lo, hi, rounding), args,
                input_channel_outer)
            gv = bb.add_func(kernel, "qconv_weight_rows_update")
            row_var = relax.DataflowVar(f"{var.name}_rows{len(rows)}", out_ty)
            out.append(relax.VarBinding(row_var, relax.call_tir(gv, args, out_ty)))
            rows.append(row_var)
        out.append(relax.VarBinding(var, R.concat(rows, axis=0)))
        return out

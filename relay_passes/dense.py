"""DenseWithoutTranspose and FuseLinearUpdate: a float fully-connected layer that never
copies its weight.

Relax writes ``x · Wᵀ`` as ``matmul(x, permute_dims(W))``, which lowers to a
transposed copy of W before the product: 50 KB for MobileNetV2's float32
classifier (1280 × 10), alive next to the forward's activations. Its SGD update
``W − lr · (gᵀ · x)`` materializes the weight gradient, another 50 KB. Both run
after Gradient, on the training step (``predict`` keeps its Relax ops, which
``export_onnx`` reads).

Before::

    wt = R.permute_dims(w)                            # (K, O) copy
    y = R.matmul(x, wt)
    ...
    gt = R.permute_dims(g, axes=[1, 0])
    gw = R.matmul(gt, x)                              # (O, K) weight gradient
    w_new = R.subtract(w, R.multiply(learning_rate, gw))

After::

    y = R.call_tir(dense, (x, w))                     # Σ_k x[n, k] · w[o, k]
    ...
    w_new = R.call_tir(linear_sgd_update, (w, g, x, learning_rate))   # in place over w
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from .attrs import learning_rate_var
from .exprs import constant_and_other, scalar_and_other, use_counts, with_bindings
from .int8_ops import fused_accumulator, make_kernel

_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_MATMUL = tvm.ir.Op.get("relax.matmul")
_SUBTRACT = tvm.ir.Op.get("relax.subtract")


def _call(value, op) -> bool:
    return isinstance(value, relax.Call) and value.op == op


def _is_transpose(value) -> bool:
    if not _call(value, _PERMUTE) or len(value.args[0].ty.shape) != 2:
        return False
    axes = value.attrs.axes
    return axes is None or [int(a) for a in axes] == [1, 0]


def _dense_te(x, w):
    k = te.reduce_axis((0, int(x.shape[1])), "k")
    return te.compute((int(x.shape[0]), int(w.shape[0])), lambda n, o: te.sum(x[n, k] * w[o, k], axis=k),
                      name="y")


def _sgd_update_te(w, g, x, lr):
    """``w − lr · Σ_n g[n, o] · x[n, k]``, the sum one scalar per weight."""
    n = te.reduce_axis((0, int(x.shape[0])), "n")
    grad = te.compute(w.shape, lambda o, k: te.sum(g[n, o] * x[n, k], axis=n), name="g_w")
    return te.compute(w.shape, lambda o, k: w[o, k] - lr[()] * grad[o, k], name="y")


def _rewrite(mod: tvm.IRModule, name: str, replace) -> tvm.IRModule:
    """Rebind ``name``'s one dataflow block with ``replace(bb, binding, defs, uses)`` (None: keep)."""
    func = mod[name]
    if len(func.body.blocks) != 1:
        return mod
    bindings = list(func.body.blocks[0].bindings)
    defs = {b.var: b.value for b in bindings}
    uses = use_counts(func)
    bb = relax.BlockBuilder(mod)
    new = []
    for b in bindings:
        value = replace(bb, b, defs, uses)
        new.append(b if value is None else relax.VarBinding(b.var, value))
    return with_bindings(bb.get(), func, name, new)


@tvm.transform.module_pass(opt_level=0, name="DenseWithoutTranspose")
def DenseWithoutTranspose(mod: tvm.IRModule, ctx) -> tvm.IRModule:
    def replace(bb, b, defs, uses):
        if not _call(b.value, _MATMUL):
            return None
        x, wt = b.value.args
        if len(x.ty.shape) != 2 or wt not in defs or not _is_transpose(defs[wt]) or uses.get(wt) != 1:
            return None
        w = defs[wt].args[0]
        if str(x.ty.dtype) != "float32" or str(w.ty.dtype) != "float32":
            return None
        func, out_ty = make_kernel(_dense_te, [x, w])
        return relax.call_tir(bb.add_func(func, "dense"), [x, w], out_ty)

    return _rewrite(mod, "train_step", replace)  # predict keeps Relax ops (export_onnx reads them)


@tvm.transform.module_pass(opt_level=0, name="FuseLinearUpdate")
def FuseLinearUpdate(mod: tvm.IRModule, ctx) -> tvm.IRModule:
    lr_var = learning_rate_var(mod["train_step"])

    def replace(bb, b, defs, uses):
        if not _call(b.value, _SUBTRACT):
            return None
        w, step = b.value.args
        if step not in defs or uses.get(step) != 1:
            return None
        split = constant_and_other(defs[step]) or scalar_and_other(defs[step], lr_var)
        if split is None or (isinstance(split[0], np.ndarray) and split[0].size != 1):
            return None
        lr, grad = split
        if grad not in defs or uses.get(grad) != 1 or not _call(defs[grad], _MATMUL):
            return None
        gt, x = defs[grad].args
        if gt not in defs or uses.get(gt) != 1 or not _is_transpose(defs[gt]):
            return None
        g = defs[gt].args[0]
        if len(x.ty.shape) != 2 or str(w.ty.dtype) != "float32":
            return None
        if isinstance(lr, np.ndarray):
            lr = relax.const(np.float32(lr.reshape(())), "float32")
        func, out_ty = make_kernel(_sgd_update_te, [w, g, x, lr], fused_accumulator)
        # element i of the new weight reads element i of the old one only: written over it
        func = func.with_attr("tinytrain.elementwise_in", [0])
        return relax.call_tir(bb.add_func(func, "linear_sgd_update"), [w, g, x, lr], out_ty)

    return _rewrite(mod, "train_step", replace)

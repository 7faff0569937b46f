"""The gradients of the quantized ops of ``int8_ops``, registered for Relax's Gradient.

Each quantized op is a real function of its int8 values (``DESIGN.md``, int8
semantics): rounding passes the gradient straight through, clamped outputs pass
none, and the result is float32. For a conv, ``acc = Σ (x − zx)·w + b`` and
``y = clamp(round(M·acc) + zy)`` with ``M = s_x·s_w / s_y`` per output channel, so
``∂L/∂acc = [lo < y < hi]·M·∂L/∂y``, ``∂L/∂w = Σ (x − zx)·∂L/∂acc`` (read from the
saved int8 input, never a float copy of it), ``∂L/∂b = Σ ∂L/∂acc`` and ``∂L/∂x`` the
transposed conv over the int8 weight. Importing this module registers them.
"""

from __future__ import annotations

import numpy as np
import tvm_ffi
from tvm import relax, te, tirx
from tvm.relax import op as R

from .int8_ops import QAddParams, QConvParams, QPoolParams, _kw, _window, emit_tagged_kernel, qconv_params

GRAD_PREFIX = "tvm.relax.te_grad._register."

def _f32(values) -> relax.Constant:
    return relax.const(np.asarray(values, np.float32))

def _grad_through_clamp(ctx, y, g, multiplier: relax.Constant, lo: int, hi: int, channel_axis: int):
    """``[lo < y < hi] · M[c] · g``: the output's clamp and the requant multiplier."""
    def body(yt, gt, mt):
        def f(*i):
            yv = yt[i]
            inside = tirx.all(yv > tirx.const(lo, "int8"), yv < tirx.const(hi, "int8"))
            return tirx.Select(inside, gt[i] * mt[i[channel_axis]], tirx.const(0, "float32"))
        return te.compute(gt.shape, f, name="g_acc")
    return ctx.emit_te(body, y, g, multiplier, primfunc_name_hint="qgrad_clamp")

def _qconv_weight_grad(q: QConvParams, x, g, w_shape):
    n, c, h, wd = (int(d) for d in x.shape)
    o, i_g, kh, kw = w_shape
    _, _, oh, ow = (int(d) for d in g.shape)
    (sh, sw), (pt, pl, _, _) = q.strides, q.padding
    per_group = o // q.groups
    rn, ry, rx = te.reduce_axis((0, n), "rn"), te.reduce_axis((0, oh), "ry"), te.reduce_axis((0, ow), "rx")

    def x_minus_zero(nn, cc, hh, ww):
        inside = tirx.all(hh >= 0, hh < h, ww >= 0, ww < wd)
        v = x[nn, cc, tirx.max(tirx.min(hh, h - 1), 0), tirx.max(tirx.min(ww, wd - 1), 0)]
        return tirx.Select(inside, v.astype("float32") - tirx.const(q.zx, "float32"),
                           tirx.const(0.0, "float32"))

    return te.compute((o, i_g, kh, kw), lambda oo, ii, ky, kx: te.sum(
        g[rn, oo, ry, rx] * x_minus_zero(rn, (oo // per_group) * i_g + ii, ry * sh + ky - pt,
                                         rx * sw + kx - pl), axis=[rn, ry, rx]), name="g_w")

def _qconv_input_grad(q: QConvParams, g, w, x_shape):
    """The transposed conv, reading the int8 weight directly (no float copy of it, no
    dilated and padded copy of the gradient as conv2d_transpose would make)."""
    n, c, h, wd = x_shape
    o, i_g, kh, kw = (int(d) for d in w.shape)
    _, _, oh, ow = (int(d) for d in g.shape)
    (sh, sw), (pt, pl, _, _) = q.strides, q.padding
    per_group = o // q.groups
    ro = te.reduce_axis((0, per_group), "ro")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def term(nn, cc, yy, xx):
        oc = (cc // i_g) * per_group + ro
        ty, tx = yy + pt - ry, xx + pl - rx
        oy, ox = tirx.floordiv(ty, sh), tirx.floordiv(tx, sw)
        valid = tirx.all(ty >= 0, tx >= 0, tirx.floormod(ty, sh) == 0, tirx.floormod(tx, sw) == 0,
                         oy < oh, ox < ow)
        value = g[nn, oc, tirx.max(tirx.min(oy, oh - 1), 0), tirx.max(tirx.min(ox, ow - 1), 0)] \
            * w[oc, tirx.floormod(cc, i_g), ry, rx].astype("float32")
        return tirx.Select(valid, value, tirx.const(0.0, "float32"))

    return te.compute((n, c, h, wd), lambda nn, cc, yy, xx: te.sum(term(nn, cc, yy, xx), axis=[ro, ry, rx]),
                      name="g_x")

def _qlinear_weight_grad(q: QConvParams, x, g):
    r = te.reduce_axis((0, int(x.shape[0])), "r")
    return te.compute((int(g.shape[1]), int(x.shape[1])), lambda o, k: te.sum(
        g[r, o] * (x[r, k].astype("float32") - tirx.const(q.zx, "float32")), axis=r), name="g_w")

def _qconv_grad(orig_var, call, output_grad, ctx):
    q = qconv_params(call)
    x, w, b, mult, shift = call.args[1]
    g_acc = _grad_through_clamp(ctx, orig_var, output_grad, _f32(q.real_multiplier), q.lo, q.hi, 1)
    w_shape = [int(d) for d in w.ty.shape]
    g_w = emit_tagged_kernel(ctx, lambda xt, gt: _qconv_weight_grad(q, xt, gt, w_shape), [x, g_acc],
                             "tinytrain_qconv_weight_grad", q.kwargs())
    g_b = ctx.emit(R.sum(g_acc, axis=[0, 2, 3]))
    x_shape = [int(d) for d in x.ty.shape]
    g_x = ctx.emit_te(lambda gt, wt: _qconv_input_grad(q, gt, wt, x_shape), g_acc, w,
                      primfunc_name_hint="qconv_input_grad")
    return ctx.emit(relax.Tuple([g_x, g_w, g_b, R.grad.no_grad(mult), R.grad.no_grad(shift)]))

def _qlinear_grad(orig_var, call, output_grad, ctx):
    q = qconv_params(call)
    x, w, b, mult, shift = call.args[1]
    g_acc = _grad_through_clamp(ctx, orig_var, output_grad, _f32(q.real_multiplier), q.lo, q.hi, 1)

    g_w = emit_tagged_kernel(ctx, lambda xt, gt: _qlinear_weight_grad(q, xt, gt), [x, g_acc],
                             "tinytrain_qlinear_weight_grad", q.kwargs())
    g_b = ctx.emit(R.sum(g_acc, axis=[0]))

    def input_grad(gt, wt):
        r = te.reduce_axis((0, int(wt.shape[0])), "r")
        return te.compute((int(gt.shape[0]), int(wt.shape[1])), lambda i, k: te.sum(
            gt[i, r] * wt[r, k].astype("float32"), axis=r), name="g_x")

    g_x = ctx.emit_te(input_grad, g_acc, w, primfunc_name_hint="qlinear_input_grad")
    return ctx.emit(relax.Tuple([g_x, g_w, g_b, R.grad.no_grad(mult), R.grad.no_grad(shift)]))

def _qadd_grad(orig_var, call, output_grad, ctx):
    q = QAddParams.from_kwargs(_kw(call))
    ones = np.ones(int(orig_var.ty.shape[1]))
    g_a = _grad_through_clamp(ctx, orig_var, output_grad, _f32(ones * q.sa / q.sy), q.lo, q.hi, 1)
    g_b = _grad_through_clamp(ctx, orig_var, output_grad, _f32(ones * q.sb / q.sy), q.lo, q.hi, 1)
    return ctx.emit(relax.Tuple([g_a, g_b]))

def _qavgpool_grad(orig_var, call, output_grad, ctx):
    q = QPoolParams.from_kwargs(_kw(call))
    (x,) = call.args[1]
    ones = np.ones(int(orig_var.ty.shape[1]))
    g = _grad_through_clamp(ctx, orig_var, output_grad, _f32(ones), q.lo, q.hi, 1)
    n, c, h, w = (int(d) for d in x.ty.shape)
    _, _, oh, ow = (int(d) for d in orig_var.ty.shape)
    kh, kw = q.pool

    def body(gt):
        ry, rx = te.reduce_axis((0, oh), "ry"), te.reduce_axis((0, ow), "rx")

        def share(nn, cc, yy, xx, oy, ox):
            y0, x0, count = _window(q, h, w, oy, ox)
            covered = tirx.all(yy >= y0, yy < y0 + kh, xx >= x0, xx < x0 + kw)
            return tirx.Select(covered, gt[nn, cc, oy, ox] / count.astype("float32"),
                               tirx.const(0.0, "float32"))

        return te.compute((n, c, h, w), lambda nn, cc, yy, xx: te.sum(
            share(nn, cc, yy, xx, ry, rx), axis=[ry, rx]), name="g_x")

    return ctx.emit(relax.Tuple([ctx.emit_te(body, g, primfunc_name_hint="qavgpool_grad")]))

def _dequantize_grad(orig_var, call, output_grad, ctx):
    scale = float(_kw(call)["scale"])
    return ctx.emit(relax.Tuple([ctx.emit(R.multiply(output_grad, relax.const(scale, "float32")))]))

for _name, _handler in [("tinytrain_qconv", _qconv_grad), ("tinytrain_qlinear", _qlinear_grad),
                        ("tinytrain_qadd", _qadd_grad), ("tinytrain_qavgpool", _qavgpool_grad),
                        ("tinytrain_dequantize", _dequantize_grad)]:
    tvm_ffi.register_global_func(GRAD_PREFIX + _name, _handler, override=True)

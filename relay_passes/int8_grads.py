"""The gradients of the quantized ops of ``int8_ops``, registered for Relax's Gradient.

Each quantized op is a real function of its int8 values (``DESIGN.md``, int8
semantics): rounding passes the gradient straight through, clamped outputs pass
none, and the result is float32. For a conv, ``acc = Σ (x − zx)·w + b`` and
``y = clamp(round(M·acc) + zy)`` with ``M = s_x·s_w / s_y`` per output channel, so
``∂L/∂acc = [lo < y < hi]·M·∂L/∂y``, ``∂L/∂w = Σ (x − zx)·∂L/∂acc`` (read from the
saved int8 input, never a float copy of it), ``∂L/∂b = Σ ∂L/∂acc`` and ``∂L/∂x`` the
transposed conv over the int8 weight. Importing this module registers them.

What the backward keeps is small: a clamp mask of one bit per output element (not
the int8 output); the clamped gradient, computed inside each kernel that reads it
(``_ClampedGrad``), reading through a global pool's spread and a 1×1 conv's input
gradient; and an inverted bottleneck's middle gradient made a few channels at a
time (``_chunked_expansion_grad``). The TE bodies are in ``int8_grad_kernels``.
"""

from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, te, tirx
from tvm.relax import op as R

from .exprs import constant_value
from .int8_grad_kernels import (
    ROWS_WEIGHT_GRAD,
    THROUGH_BIAS,
    THROUGH_ROWS,
    channel_at_a_time,
    channel_sums_te,
    depthwise_input_grad_te,
    input_channel_rows,
    is_depthwise,
    is_global_window,
    is_pointwise,
    masked,
    output_channel_outer,
    pack_clamp_mask_te,
    padded_channels,
    pointwise_grad_rows_te,
    pointwise_input_grad_te,
    qconv_input_grad_te,
    qconv_weight_grad_te,
    qlinear_weight_grad_te,
    rows_weight_grad,
    spread_te,
    sums_per_channel,
)
from .int8_ops import (
    QAddParams,
    QConvParams,
    QPoolParams,
    _kw,
    _window,
    emit_tagged_kernel,
    make_kernel,
    qconv_params,
)

GRAD_PREFIX = "tvm.relax.te_grad._register."

def _f32(values) -> relax.Constant:
    return relax.const(np.asarray(values, np.float32))

def _emit(ctx, te_func, args: list, name: str, schedule=None):
    """``te_func`` over ``args`` as a kernel with 32-bit loop indices (``emit_te`` would give
    them Relax's int64 shapes: 64-bit index arithmetic on a 32-bit core)."""
    func, out_ty = make_kernel(te_func, args, schedule)
    return ctx.emit(relax.call_tir(ctx.add_func(func, name), args, out_ty))

def _clamp_mask(ctx, y, lo: int | None, hi: int | None):
    """The packed clamp mask of a forward output: the backward reads it instead of the
    int8 output, 8× smaller, so the output dies after its forward consumers (the
    reorder runs this right after the output is made)."""
    return _emit(ctx, lambda yt: pack_clamp_mask_te(yt, lo, hi), [y], "pack_clamp_mask")

def _clampable_bounds(lo: int, hi: int, least, greatest) -> tuple[int | None, int | None]:
    """(lo, hi) with None for a bound the output cannot pass: ``least`` / ``greatest`` are
    the extremes (numbers, or arrays per channel) of its value before rounding and clamp.
    An output at such a bound was not clamped and passes its gradient."""
    margin = 0.5 - 1e-6  # rounds to the bound or inside it, with room for the fixed-point multiplier
    return (None if np.all(np.asarray(least) >= lo - margin) else lo,
            None if np.all(np.asarray(greatest) <= hi + margin) else hi)

def _reachable_bounds(q: QConvParams, w, b) -> tuple[int | None, int | None]:
    """The output bounds a conv with constant ``w`` and ``b`` (a pool written as a conv) can
    clamp at, over every int8 input (:func:`_clampable_bounds`). Trainable weights move, so
    their bounds all stay."""
    if not (isinstance(w, tvm.ir.expr.Constant) and isinstance(b, tvm.ir.expr.Constant)):
        return q.lo, q.hi
    wv = constant_value(w).astype(np.float64).reshape(int(w.ty.shape[0]), -1)
    low, high = -128.0 - q.zx, 127.0 - q.zx  # x − zx; padding adds 0, inside [low, high]
    pos, neg = np.clip(wv, 0, None).sum(axis=1), np.clip(wv, None, 0).sum(axis=1)
    bias = constant_value(b).astype(np.float64)
    acc_min, acc_max = pos * low + neg * high + bias, pos * high + neg * low + bias
    m = q.real_multiplier
    return _clampable_bounds(q.lo, q.hi, m * acc_min + q.zy, m * acc_max + q.zy)

def _grad_through_clamp(ctx, mask, g, multiplier: relax.Constant, channel_axis: int):
    """``[lo < y < hi] · M[c] · g``: the output's clamp (a packed mask) and the requant
    multiplier. Each element reads only its own element of ``g``, so the result may
    overwrite ``g`` in place (``tinytrain.elementwise_in``)."""
    shape = [int(d) for d in g.ty.shape]

    def body(mt, gt, kt):
        return te.compute(gt.shape, lambda *i: masked(mt, shape, i, gt[i] * kt[i[channel_axis]]),
                          name="g_acc")

    func, out_ty = make_kernel(body, [mask, g, multiplier])
    gv = ctx.add_func(func.with_attr("tinytrain.elementwise_in", [1]), "qgrad_clamp")
    return ctx.emit(relax.call_tir(gv, [mask, g, multiplier], out_ty))

def _emit_spread(ctx, g, w, shape):
    """The input gradient of a global pool, as a kernel tagged ``tinytrain.spread``: the
    gradient kernels of the layer before read ``(g, w)`` instead of the wide tensor."""
    func, out_ty = make_kernel(lambda gt, wt: spread_te(gt, wt, shape), [g, w])
    gv = ctx.add_func(func.with_attr("tinytrain.spread", True), "spread_grad")
    return ctx.emit(relax.call_tir(gv, [g, w], out_ty))

def _producer(ctx, var):
    """The value that made ``var``, through the aliases and tuple fields Gradient binds."""
    value = ctx.lookup_binding(var)
    for _ in range(8):
        if isinstance(value, relax.Var):
            value = ctx.lookup_binding(value)
        elif isinstance(value, relax.TupleGetItem):
            tup = value.tuple_value
            tup = ctx.lookup_binding(tup) if isinstance(tup, relax.Var) else tup
            if not isinstance(tup, relax.Tuple):
                return None
            value = tup.fields[value.index]
        else:
            return value
    return value

def _tagged_producer(ctx, var, tags=("tinytrain.spread", "tinytrain.pointwise")):
    """(the tag among ``tags``, the kernel's arguments, its attributes) when ``var`` was
    made by a kernel so tagged, else (None, [], None)."""
    value = _producer(ctx, var)
    if isinstance(value, relax.Call) and isinstance(value.args[0], relax.GlobalVar):
        attrs = ctx.get()[value.args[0]].attrs
        for tag in tags:
            if attrs is not None and tag in attrs:
                return tag, list(value.args[1]), attrs
    return None, [], None

class _ClampedGrad:
    """``[lo < y < hi] · M[c] · ∂L/∂y`` computed inside each kernel that reads it, never a
    tensor, from the packed mask, the multiplier and the output gradient. Two producers
    of that gradient are read through instead of their wide outputs:

    - a global pool's spread: ``g[n, c, 0, 0] · w[c, 0, h, w]`` (the pool's small
      gradient and its weights);
    - a 1×1 conv's input gradient: ``Σ_o g[n, o, h, w] · w[o, c]`` (the next layer's
      narrow clamped gradient and its int8 weight); the sum over ``o`` joins the
      reading kernel's own reduction (:attr:`axes`), so the wide gradient of a frozen
      bottleneck's middle never exists."""

    def __init__(self, ctx, mask, multiplier, output_grad):
        tag, source, _ = _tagged_producer(ctx, output_grad)
        self._set([int(d) for d in output_grad.ty.shape], tag, [mask, multiplier, *(source or [output_grad])])

    @classmethod
    def of_parts(cls, shape, tag, args) -> _ClampedGrad:
        """Over ``args = [mask, multiplier, *source]`` as a kernel tagged ``tag`` took them."""
        self = cls.__new__(cls)
        self._set(shape, tag, args)
        return self

    def _set(self, shape, tag, args):
        self.shape, self.tag, self.args = shape, tag, args
        self.axes = []
        if tag == "tinytrain.pointwise":
            self.axes = [te.reduce_axis((0, int(args[3].ty.shape[0])), "rp")]

    @property
    def narrow(self) -> bool:
        """The output gradient is a tensor already (so a clamped copy costs nothing more)."""
        return self.tag is None

    def reader(self, tensors):
        """``at(n, c, h, w)``: the clamped gradient there (a term of the sum over
        :attr:`axes` when there are any), over the kernel's placeholders for :attr:`args`."""
        mt, kt, *src = tensors
        shape = self.shape

        def source(n, c, h, w):
            if self.tag == "tinytrain.spread":
                g, wt = src
                return g[n, c, 0, 0] * wt[c if int(wt.shape[0]) > 1 else 0, 0, h, w].astype("float32")
            if self.tag == "tinytrain.pointwise":
                g, wt = src
                (rp,) = self.axes
                return g[n, rp, h, w] * wt[rp, c, 0, 0].astype("float32")
            return src[0][n, c, h, w]

        def at(n, c, h, w):
            return masked(mt, shape, (n, c, h, w), source(n, c, h, w) * kt[c])
        return at

    def emit(self, ctx, te_func, extra: list, name: str, schedule=None):
        """``te_func(at, axes, *extra)`` as a kernel: ``at`` reads the clamped gradient,
        ``axes`` must join the kernel's reduction."""
        n = len(self.args)
        return _emit(ctx, lambda *t: te_func(self.reader(t[:n]), self.axes, *t[n:]), [*self.args, *extra],
                     name, schedule)

def _qconv_grad(orig_var, call, output_grad, ctx):
    q = qconv_params(call)
    x, w, b, mult, shift = call.args[1]
    mask = _clamp_mask(ctx, orig_var, *_reachable_bounds(q, w, b))
    multiplier = _f32(q.real_multiplier)
    w_shape = [int(d) for d in w.ty.shape]
    x_shape = [int(d) for d in x.ty.shape]
    out_shape = [int(d) for d in orig_var.ty.shape]
    out_hw = out_shape[2:]
    if q.groups == x_shape[1] == w_shape[0] and is_global_window(x_shape[2:], out_hw, q.padding) \
            and isinstance(w, tvm.ir.expr.Constant):  # a global pool written as a conv
        g_acc = _grad_through_clamp(ctx, mask, output_grad, multiplier, 1)
        g_x = _emit_spread(ctx, g_acc, w, x_shape)
        return ctx.emit(relax.Tuple([g_x, R.grad.no_grad(w), R.grad.no_grad(b),
                                     R.grad.no_grad(mult), R.grad.no_grad(shift)]))
    through, through_args, through_attrs = _tagged_producer(ctx, output_grad, ("tinytrain.dw_through",))
    if through and is_pointwise(q, w_shape):
        return _chunked_expansion_grad(ctx, q, call, mask, multiplier, through_args, through_attrs,
                                       out_shape)
    # the weight gradient reads a tensor (FuseWeightUpdate rewrites it); unused, it dies
    g_acc = _grad_through_clamp(ctx, mask, output_grad, multiplier, 1)
    g_w = emit_tagged_kernel(ctx, lambda xt, gt: qconv_weight_grad_te(q, xt, gt, w_shape), [x, g_acc],
                             "tinytrain_qconv_weight_grad", q.kwargs())
    clamped = _ClampedGrad(ctx, mask, multiplier, output_grad)

    def bias_grad(at, axes):
        o = w_shape[0]
        rn, ry, rx = (te.reduce_axis((0, d), f"r{k}") for k, d in enumerate([x_shape[0], *out_hw]))
        return te.compute((o,), lambda c: te.sum(at(rn, c, ry, rx), axis=[rn, ry, rx, *axes]), name="g_b")

    if clamped.tag == "tinytrain.pointwise":
        # the clamped gradient read through a 1×1 conv: made a channel at a time
        # (pointwise_grad_rows_te, each sum over that conv's channels scaled once), then summed
        # (tagged: where the layer before makes the same sums in chunks, BiasFromThroughRows
        # sums those instead)
        g_b = emit_tagged_kernel(
            ctx, lambda *t: channel_sums_te(pointwise_grad_rows_te(*t, 0, w_shape[0], out_shape)),
            clamped.args, THROUGH_BIAS, {"channels": w_shape[0]}, sums_per_channel, "qconv_bias_grad")
    else:
        g_b = clamped.emit(ctx, bias_grad, [], "qconv_bias_grad")
    if clamped.narrow and is_pointwise(q, w_shape):
        # read through by the layer before (_ClampedGrad): its wide gradient is never made
        func, out_ty = make_kernel(lambda gt, wt: pointwise_input_grad_te(gt, wt, x_shape), [g_acc, w],
                                   input_channel_rows)
        gv = ctx.add_func(func.with_attr("tinytrain.pointwise", True), "qconv_input_grad")
        g_x = ctx.emit(relax.call_tir(gv, [g_acc, w], out_ty))
    elif is_pointwise(q, w_shape) and not clamped.axes:
        # the clamped gradient read through (a global pool's spread): made once per output
        # channel, H·W floats at a time
        def input_grad(at, axes, wt):
            ga = te.compute(out_shape, at, name="ga")
            return pointwise_input_grad_te(ga, wt, x_shape)

        g_x = clamped.emit(ctx, input_grad, [w], "qconv_input_grad", output_channel_outer)
    elif clamped.tag == "tinytrain.pointwise" and q.groups == x_shape[1] == w_shape[0]:
        # a depthwise conv between two 1×1 convs: the expansion before reads this in
        # channel chunks (_chunked_expansion_grad); kept whole only where nothing does
        def dw_input_grad(m, k, g, wp, wd):  # the clamped output gradient, one channel at a time
            gd = pointwise_grad_rows_te(m, k, g, wp, 0, out_shape[1], out_shape)
            return depthwise_input_grad_te(q, lambda *i: gd[i], out_hw, wd, x_shape)

        func, out_ty = make_kernel(dw_input_grad, [*clamped.args, w], channel_at_a_time)
        func = func.with_attrs({"tinytrain.dw_through": True, "tinytrain.kwargs": q.kwargs(),
                                "tinytrain.out_shape": out_shape})
        gv = ctx.add_func(func, "qconv_input_grad")
        g_x = ctx.emit(relax.call_tir(gv, [*clamped.args, w], out_ty))
    elif is_depthwise(q, w_shape, x_shape[1]) and not clamped.axes:
        g_x = clamped.emit(ctx, lambda at, axes, wt: depthwise_input_grad_te(q, at, out_hw, wt, x_shape),
                           [w], "qconv_input_grad", padded_channels)
    else:
        g_x = clamped.emit(ctx, lambda at, axes, wt: qconv_input_grad_te(q, at, axes, out_hw, wt, x_shape),
                           [w], "qconv_input_grad")
    return ctx.emit(relax.Tuple([g_x, g_w, g_b, R.grad.no_grad(mult), R.grad.no_grad(shift)]))

CHUNK_BYTES = 8 * 1024  # the largest slice of a bottleneck's middle gradient made at once

def _expansion_chunk(ctx, q: QConvParams, x, w, g_c, c0: int, out_shape, g_x):
    """One chunk of :func:`_chunked_expansion_grad`: (bias gradient rows, weight gradient
    rows, the input gradient summed so far) from ``g_c``, channels ``c0 ..`` of the
    expansion's clamped output gradient."""
    n, _, h, wd = out_shape
    step = int(g_c.ty.shape[1])
    x_shape = [int(d) for d in x.ty.shape]

    def bias(gt):
        rn, ry, rx = (te.reduce_axis((0, d), f"r{i}") for i, d in enumerate((n, h, wd)))
        return te.compute((step,), lambda j: te.sum(gt[rn, j, ry, rx], axis=[rn, ry, rx]), name="g_b")

    b = _emit(ctx, bias, [g_c], "qconv_bias_grad_chunk")
    weight = emit_tagged_kernel(ctx, lambda xt, gt: rows_weight_grad(q, xt, gt), [x, g_c], ROWS_WEIGHT_GRAD,
                                {**q.kwargs(), "c0": c0})
    args = [g_c, w, *([g_x] if g_x is not None else [])]
    func, out_ty = make_kernel(lambda gt, wt, *acc: pointwise_input_grad_te(gt, wt, x_shape, c0, *acc), args,
                               input_channel_rows)
    if g_x is not None:  # adds into the running sum in place
        func = func.with_attr("tinytrain.elementwise_in", [2])
    gv = ctx.add_func(func, "qconv_input_grad_accumulate")
    return b, weight, ctx.emit(relax.call_tir(gv, args, out_ty))

def _chunked_expansion_grad(ctx, q: QConvParams, call, mask, multiplier, through: list, attrs,
                            out_shape):
    """The gradients of a 1×1 expansion ``E`` whose output feeds a depthwise ``D`` that feeds
    a 1×1 projection ``P`` (an inverted bottleneck), a few middle channels at a time.

    ``∂L/∂e`` (the wide middle gradient) is D's input gradient, computed by reading through
    P's narrow clamped gradient. Everything E needs of it is per middle channel (its bias
    and weight rows) or a sum over middle channels (its input gradient), so each chunk of
    channels is made, used and dropped: the bias and weight gradients are concatenated
    from their chunks, the input gradient accumulated over them."""
    x, w, b, mult, shift = call.args[1]
    n, channels, h, wd = out_shape
    q_d = QConvParams.from_kwargs({str(k): v for k, v in attrs["tinytrain.kwargs"].items()})
    d_shape = [int(v) for v in attrs["tinytrain.out_shape"]]
    d_clamped = _ClampedGrad.of_parts(d_shape, "tinytrain.pointwise", through[:4])
    w_d = through[4]
    per_channel = n * h * wd * 4
    fits = [k for k in range(channels, 0, -1) if channels % k == 0 and k * per_channel <= CHUNK_BYTES]
    step = fits[0] if fits else 1
    g_x = None
    biases, weights = [], []
    for c0 in range(0, channels, step):
        # D's clamped output gradient on the chunk's channels (once: the depthwise input
        # gradient reads each element k² times), then D's input gradient on them
        g_d = emit_tagged_kernel(ctx, lambda *t, c0=c0: pointwise_grad_rows_te(*t, c0, step, d_shape),
                                 d_clamped.args, THROUGH_ROWS, {"c0": c0, "step": step}, sums_per_channel,
                                 "qgrad_through_rows")

        def clamped_input_grad(gd, wd, mt, kt, c0=c0):  # D's input gradient, E's clamp applied
            g_e = depthwise_input_grad_te(q_d, lambda nn, oc, oy, ox: gd[nn, oc - c0, oy, ox], d_shape[2:],
                                          wd, out_shape, (c0, step))
            return te.compute(g_e.shape, lambda nn, j, yy, xx: masked(
                mt, out_shape, (nn, j + c0, yy, xx), g_e[nn, j, yy, xx] * kt[j + c0]), name="y")

        g_c = _emit(ctx, clamped_input_grad, [g_d, w_d, mask, multiplier], "qconv_input_grad_chunk",
                    padded_channels)
        bias, weight, g_x = _expansion_chunk(ctx, q, x, w, g_c, c0, out_shape, g_x)
        biases.append(bias)
        weights.append(weight)
    g_b = biases[0] if len(biases) == 1 else ctx.emit(R.concat(biases, axis=0))
    g_w = ctx.emit(R.concat(weights, axis=0))  # FuseWeightUpdate fuses each chunk's rows
    return ctx.emit(relax.Tuple([g_x, g_w, g_b, R.grad.no_grad(mult), R.grad.no_grad(shift)]))

def _qlinear_grad(orig_var, call, output_grad, ctx):
    q = qconv_params(call)
    x, w, b, mult, shift = call.args[1]
    mask = _clamp_mask(ctx, orig_var, q.lo, q.hi)
    g_acc = _grad_through_clamp(ctx, mask, output_grad, _f32(q.real_multiplier), 1)

    g_w = emit_tagged_kernel(ctx, lambda xt, gt: qlinear_weight_grad_te(q, xt, gt), [x, g_acc],
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
    mask = _clamp_mask(ctx, orig_var, q.lo, q.hi)
    g_a = _grad_through_clamp(ctx, mask, output_grad, _f32(ones * q.sa / q.sy), 1)
    g_b = _grad_through_clamp(ctx, mask, output_grad, _f32(ones * q.sb / q.sy), 1)
    return ctx.emit(relax.Tuple([g_a, g_b]))

def _qavgpool_grad(orig_var, call, output_grad, ctx):
    q = QPoolParams.from_kwargs(_kw(call))
    (x,) = call.args[1]
    # the mean of int8 values is inside the int8 range: only a bound narrower than that
    # (a fused activation) can clamp. A mean at −128 that nothing clamped (after a ReLU,
    # every window whose mean rounds to real 0) passes its gradient, as in float.
    lo, hi = _clampable_bounds(q.lo, q.hi, -128, 127)
    g = output_grad
    if lo is not None or hi is not None:
        ones = np.ones(int(orig_var.ty.shape[1]))
        g = _grad_through_clamp(ctx, _clamp_mask(ctx, orig_var, lo, hi), output_grad, _f32(ones), 1)
    n, c, h, w = (int(d) for d in x.ty.shape)
    _, _, oh, ow = (int(d) for d in orig_var.ty.shape)
    kh, kw = q.pool
    if is_global_window((h, w), (oh, ow), q.padding) and (kh, kw) == (h, w):
        share = relax.const(np.full((1, 1, h, w), 1.0 / (h * w), np.float32))
        return ctx.emit(relax.Tuple([_emit_spread(ctx, g, share, [n, c, h, w])]))

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

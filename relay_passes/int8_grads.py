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
import tvm
import tvm_ffi
from tvm import relax, s_tir, te, tirx
from tvm.relax import op as R

from .int8_ops import (
    QAddParams,
    QConvParams,
    QPoolParams,
    _kw,
    _window,
    emit_tagged_kernel,
    fused_accumulator,
    make_kernel,
    qconv_params,
)

GRAD_PREFIX = "tvm.relax.te_grad._register."

def _f32(values) -> relax.Constant:
    return relax.const(np.asarray(values, np.float32))

def _flat_index(shape, i):
    """Row-major position of index tuple ``i`` in ``shape``."""
    flat = i[0]
    for d, v in zip(shape[1:], i[1:]):
        flat = flat * int(d) + v
    return flat

def _unravel(shape, flat):
    out = []
    for d in reversed(shape):
        out.append(tirx.floormod(flat, int(d)))
        flat = tirx.floordiv(flat, int(d))
    return tuple(reversed(out))

def pack_clamp_mask_te(y, lo: int, hi: int):
    """One bit per element of ``y``: ``lo < y < hi`` (the output was not clamped), eight
    elements per byte, element ``k`` in bit ``k % 8`` of byte ``k // 8``."""
    shape = [int(d) for d in y.shape]
    count = int(np.prod(shape))

    def byte(j):
        total = tirx.const(0, "int32")
        for b in range(8):
            k = j * 8 + b
            v = y[_unravel(shape, tirx.min(k, count - 1))]
            inside = tirx.all(k < count, v > tirx.const(lo, y.dtype), v < tirx.const(hi, y.dtype))
            total = total + tirx.Select(inside, tirx.const(1 << b, "int32"), tirx.const(0, "int32"))
        return total.astype("uint8")

    return te.compute(((count + 7) // 8,), byte, name="mask")

def _mask_bit(mask, k):
    """Bit ``k`` of a packed mask, as a condition. The arithmetic is int32 on purpose: with
    int64 indices TVM's simplifier folds ``(byte >> (k % 8)) & 1 == 1`` to false inside a
    transposed conv's bounds branch."""
    k = k.astype("int32")
    byte = mask[tirx.floordiv(k, 8)].astype("int32")
    bit = tirx.shift_left(tirx.const(1, "int32"), tirx.floormod(k, 8))
    return tirx.floormod(tirx.floordiv(byte, bit), 2) == 1

def _clamp_mask(ctx, y, lo: int, hi: int):
    """The packed clamp mask of a forward output: the backward reads it instead of the
    int8 output, 8× smaller, so the output dies after its forward consumers (the
    reorder runs this right after the output is made)."""
    return ctx.emit_te(lambda yt: pack_clamp_mask_te(yt, lo, hi), y, primfunc_name_hint="pack_clamp_mask")

def _grad_through_clamp(ctx, mask, g, multiplier: relax.Constant, channel_axis: int):
    """``[lo < y < hi] · M[c] · g``: the output's clamp (a packed mask) and the requant
    multiplier. Each element reads only its own element of ``g``, so the result may
    overwrite ``g`` in place (``tinytrain.elementwise_in``)."""
    shape = [int(d) for d in g.ty.shape]

    def body(mt, gt, kt):
        def f(*i):
            k = _flat_index(shape, i)
            return tirx.Select(_mask_bit(mt, k), gt[i] * kt[i[channel_axis]], tirx.const(0, "float32"))
        return te.compute(gt.shape, f, name="g_acc")

    func, out_ty = make_kernel(body, [mask, g, multiplier])
    gv = ctx.add_func(func.with_attr("tinytrain.elementwise_in", [1]), "qgrad_clamp")
    return ctx.emit(relax.call_tir(gv, [mask, g, multiplier], out_ty))

def _spread_te(g, w, shape):
    """``g[n, c, 0, 0] · w[c, 0, h, w]``: the input gradient of a pool over the whole
    image (``w`` the pool's weights, one row for all channels when it has one)."""
    rows = int(w.shape[0])
    return te.compute(shape, lambda n, c, yy, xx: g[n, c, 0, 0] * w[
        c if rows > 1 else 0, 0, yy, xx].astype("float32"), name="g_x")

def _emit_spread(ctx, g, w, shape):
    """The input gradient of a global pool, as a kernel tagged ``tinytrain.spread``: the
    gradient kernels of the layer before read ``(g, w)`` instead of the wide tensor."""
    func, out_ty = make_kernel(lambda gt, wt: _spread_te(gt, wt, shape), [g, w])
    gv = ctx.add_func(func.with_attr("tinytrain.spread", True), "spread_grad")
    return ctx.emit(relax.call_tir(gv, [g, w], out_ty))

def _is_global_window(in_hw, out_hw, padding) -> bool:
    return tuple(out_hw) == (1, 1) and not any(padding) and min(in_hw) > 1

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
            k = _flat_index(shape, (n, c, h, w))
            return tirx.Select(_mask_bit(mt, k), source(n, c, h, w) * kt[c], tirx.const(0, "float32"))
        return at

    def emit(self, ctx, te_func, extra: list, name: str):
        """``te_func(at, axes, *extra)`` as a kernel: ``at`` reads the clamped gradient,
        ``axes`` must join the kernel's reduction."""
        n = len(self.args)
        return ctx.emit_te(lambda *t: te_func(self.reader(t[:n]), self.axes, *t[n:]), *self.args,
                           *extra, primfunc_name_hint=name)

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

def _qconv_input_grad(q: QConvParams, g_at, axes: list, out_hw, w, x_shape, channels=None):
    """The transposed conv, reading the int8 weight directly (no float copy of it, no
    dilated and padded copy of the gradient as conv2d_transpose would make). ``g_at(n,
    o, y, x)`` reads the output gradient (a term of a sum over ``axes``, joined here).
    ``channels=(c0, count)``: only input channels ``c0 .. c0 + count``."""
    n, c, h, wd = x_shape
    c0, c = channels if channels is not None else (0, c)
    o, i_g, kh, kw = (int(d) for d in w.shape)
    oh, ow = out_hw
    (sh, sw), (pt, pl, _, _) = q.strides, q.padding
    per_group = o // q.groups
    ro = te.reduce_axis((0, per_group), "ro")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def term(nn, cc, yy, xx):
        cc = cc + c0
        oc = (cc // i_g) * per_group + ro
        ty, tx = yy + pt - ry, xx + pl - rx
        oy, ox = tirx.floordiv(ty, sh), tirx.floordiv(tx, sw)
        valid = tirx.all(ty >= 0, tx >= 0, tirx.floormod(ty, sh) == 0, tirx.floormod(tx, sw) == 0,
                         oy < oh, ox < ow)
        value = g_at(nn, oc, tirx.max(tirx.min(oy, oh - 1), 0), tirx.max(tirx.min(ox, ow - 1), 0)) \
            * w[oc, tirx.floormod(cc, i_g), ry, rx].astype("float32")
        # a branch, not a select: the simplifier drops the index clamps inside it, so the
        # mask's bit shift is only in range where valid (a select would evaluate it
        # everywhere, and LLVM may fold a negative shift's poison into the whole sum)
        return tirx.if_then_else(valid, value, tirx.const(0.0, "float32"))

    return te.compute((n, c, h, wd), lambda nn, cc, yy, xx: te.sum(
        term(nn, cc, yy, xx), axis=[ro, ry, rx, *axes]), name="g_x")

def _is_pointwise(q: QConvParams, w_shape) -> bool:
    return w_shape[2:] == [1, 1] and q.groups == 1 and q.strides == (1, 1) and not any(q.padding)

def _qlinear_weight_grad(q: QConvParams, x, g):
    r = te.reduce_axis((0, int(x.shape[0])), "r")
    return te.compute((int(g.shape[1]), int(x.shape[1])), lambda o, k: te.sum(
        g[r, o] * (x[r, k].astype("float32") - tirx.const(q.zx, "float32")), axis=r), name="g_w")

def _qconv_grad(orig_var, call, output_grad, ctx):
    q = qconv_params(call)
    x, w, b, mult, shift = call.args[1]
    mask = _clamp_mask(ctx, orig_var, q.lo, q.hi)
    multiplier = _f32(q.real_multiplier)
    w_shape = [int(d) for d in w.ty.shape]
    x_shape = [int(d) for d in x.ty.shape]
    out_hw = [int(d) for d in orig_var.ty.shape][2:]
    if q.groups == x_shape[1] == w_shape[0] and _is_global_window(x_shape[2:], out_hw, q.padding) \
            and isinstance(w, tvm.ir.expr.Constant):  # a global pool written as a conv
        g_acc = _grad_through_clamp(ctx, mask, output_grad, multiplier, 1)
        g_x = _emit_spread(ctx, g_acc, w, x_shape)
        return ctx.emit(relax.Tuple([g_x, R.grad.no_grad(w), R.grad.no_grad(b),
                                     R.grad.no_grad(mult), R.grad.no_grad(shift)]))
    through, through_args, through_attrs = _tagged_producer(ctx, output_grad, ("tinytrain.dw_through",))
    if through and _is_pointwise(q, w_shape):
        return _chunked_expansion_grad(ctx, q, call, mask, multiplier, through_args, through_attrs,
                                       [int(d) for d in orig_var.ty.shape])
    # the weight gradient reads a tensor (FuseWeightUpdate rewrites it); unused, it dies
    g_acc = _grad_through_clamp(ctx, mask, output_grad, multiplier, 1)
    g_w = emit_tagged_kernel(ctx, lambda xt, gt: _qconv_weight_grad(q, xt, gt, w_shape), [x, g_acc],
                             "tinytrain_qconv_weight_grad", q.kwargs())
    clamped = _ClampedGrad(ctx, mask, multiplier, output_grad)

    def bias_grad(at, axes):
        o = w_shape[0]
        rn, ry, rx = (te.reduce_axis((0, d), f"r{k}") for k, d in enumerate([x_shape[0], *out_hw]))
        return te.compute((o,), lambda c: te.sum(at(rn, c, ry, rx), axis=[rn, ry, rx, *axes]), name="g_b")

    g_b = clamped.emit(ctx, bias_grad, [], "qconv_bias_grad")
    if clamped.narrow and _is_pointwise(q, w_shape):
        # read through by the layer before (_ClampedGrad): its wide gradient is never made
        func, out_ty = make_kernel(lambda gt, wt: _qconv_input_grad(
            q, lambda *i: gt[i], [], out_hw, wt, x_shape), [g_acc, w])
        gv = ctx.add_func(func.with_attr("tinytrain.pointwise", True), "qconv_input_grad")
        g_x = ctx.emit(relax.call_tir(gv, [g_acc, w], out_ty))
    elif clamped.tag == "tinytrain.pointwise" and q.groups == x_shape[1] == w_shape[0]:
        # a depthwise conv between two 1×1 convs: the expansion before reads this in
        # channel chunks (_chunked_expansion_grad); kept whole only where nothing does
        out_shape = [int(d) for d in orig_var.ty.shape]

        def dw_input_grad(m, k, g, wp, wd):  # the clamped output gradient, one channel at a time
            gd = _pointwise_grad_rows(m, k, g, wp, 0, out_shape[1], out_shape)
            return _qconv_input_grad(q, lambda *i: gd[i], [], out_hw, wd, x_shape)

        func, out_ty = make_kernel(dw_input_grad, [*clamped.args, w], _channel_at_a_time)
        func = func.with_attrs({"tinytrain.dw_through": True, "tinytrain.kwargs": q.kwargs(),
                                "tinytrain.out_shape": [int(d) for d in orig_var.ty.shape]})
        gv = ctx.add_func(func, "qconv_input_grad")
        g_x = ctx.emit(relax.call_tir(gv, [*clamped.args, w], out_ty))
    else:
        g_x = clamped.emit(ctx, lambda at, axes, wt: _qconv_input_grad(q, at, axes, out_hw, wt, x_shape),
                           [w], "qconv_input_grad")
    return ctx.emit(relax.Tuple([g_x, g_w, g_b, R.grad.no_grad(mult), R.grad.no_grad(shift)]))

def _accumulate_in_register(func):
    """``y = acc + Σ …``: the clamp inlined, the sum one scalar per output (no scratch)."""
    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("g_acc"))
    return fused_accumulator(sch.mod["main"])

ROWS_WEIGHT_GRAD = "tinytrain_qconv_weight_grad_rows"  # tagged, for FuseWeightUpdate

def _clamped_rows(mask, multiplier, g, c0: int, out_shape):
    """The clamp of a layer's output gradient on a chunk ``g`` of its channels from ``c0``."""
    n, _, h, wd = out_shape
    step = int(g.shape[1])

    def f(nn, j, yy, xx):
        k = _flat_index(out_shape, (nn, j + c0, yy, xx))
        value = g[nn, j, yy, xx] * multiplier[j + c0]
        return tirx.Select(_mask_bit(mask, k), value, tirx.const(0, "float32"))
    return te.compute((n, step, h, wd), f, name="g_acc")

def rows_weight_grad(q: QConvParams, x, mask, multiplier, g, c0: int, out_shape):
    """The weight gradient of output channels ``c0 .. c0 + len(g)`` of a 1×1 conv, from its
    input and a chunk ``g`` of its output gradient (before the clamp)."""
    return _qconv_weight_grad(q, x, _clamped_rows(mask, multiplier, g, c0, out_shape),
                              [int(g.shape[1]), int(x.shape[1]), 1, 1])

CHUNK_BYTES = 8 * 1024  # the largest slice of a bottleneck's middle gradient made at once

def _pointwise_grad_rows(mask, multiplier, g, w, c0: int, step: int, shape):
    """``[lo < y < hi] · M[c] · Σ_o g[n, o, h, w] · w[o, c]`` for channels ``c0 .. c0 + step`` of
    a layer's output (shape ``shape``) whose gradient comes from a 1×1 conv's input: that
    conv's narrow clamped gradient ``g`` and int8 weight ``w``."""
    n, _, h, wd = shape
    rp = te.reduce_axis((0, int(w.shape[0])), "rp")
    total = te.compute((n, step, h, wd), lambda nn, j, yy, xx: te.sum(
        g[nn, rp, yy, xx] * w[rp, j + c0, 0, 0].astype("float32"), axis=rp), name="acc")

    def clamped(nn, j, yy, xx):
        k = _flat_index(shape, (nn, j + c0, yy, xx))
        return tirx.Select(_mask_bit(mask, k), total[nn, j, yy, xx] * multiplier[j + c0],
                           tirx.const(0, "float32"))
    return te.compute((n, step, h, wd), clamped, name="y")

def _channel_at_a_time(func):
    """A depthwise input gradient whose output gradient is a stage (``y``, from the sum
    ``acc``): the stage made per channel, its H×W values in scratch, each value once."""
    sch = s_tir.Schedule(func)
    sch.compute_at(sch.get_sblock("y"), sch.get_loops(sch.get_sblock("g_x"))[1])
    acc = sch.get_sblock("acc")
    y_loops = sch.get_loops(sch.get_sblock("y"))
    sch.compute_at(acc, y_loops[-1])
    loops = sch.get_loops(acc)
    if len(loops) > len(y_loops):
        sch.decompose_reduction(acc, loops[len(y_loops)])
    return sch.mod["main"]

def _expansion_chunk(ctx, q: QConvParams, x, w, mask, multiplier, g_e, c0: int, out_shape, g_x):
    """One chunk of :func:`_chunked_expansion_grad`: (bias gradient rows, weight gradient
    rows, the input gradient summed so far) from ``g_e``, channels ``c0 ..`` of the
    expansion's output gradient."""
    n, _, h, wd = out_shape
    step = int(g_e.ty.shape[1])
    x_shape = [int(d) for d in x.ty.shape]

    def bias(mt, kt, gt):
        g = _clamped_rows(mt, kt, gt, c0, out_shape)
        rn, ry, rx = (te.reduce_axis((0, d), f"r{i}") for i, d in enumerate((n, h, wd)))
        return te.compute((step,), lambda j: te.sum(g[rn, j, ry, rx], axis=[rn, ry, rx]), name="g_b")

    def input_grad(mt, kt, gt, wt, *acc):
        g = _clamped_rows(mt, kt, gt, c0, out_shape)
        r = te.reduce_axis((0, step), "rc")
        part = te.compute(x_shape, lambda nn, i, yy, xx: te.sum(
            g[nn, r, yy, xx] * wt[r + c0, i, 0, 0].astype("float32"), axis=r), name="part")
        if not acc:
            return part
        return te.compute(x_shape, lambda *i: acc[0][i] + part[i], name="y")

    b = ctx.emit_te(bias, mask, multiplier, g_e, primfunc_name_hint="qconv_bias_grad_chunk")
    weight = emit_tagged_kernel(
        ctx, lambda xt, mt, kt, gt: rows_weight_grad(q, xt, mt, kt, gt, c0, out_shape),
        [x, mask, multiplier, g_e], ROWS_WEIGHT_GRAD, {**q.kwargs(), "c0": c0, "out_shape": list(out_shape)})
    args = [mask, multiplier, g_e, w, *([g_x] if g_x is not None else [])]
    func, out_ty = make_kernel(input_grad, args, _accumulate_in_register if g_x is not None else None)
    if g_x is not None:  # adds into the running sum in place
        func = func.with_attr("tinytrain.elementwise_in", [4])
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
        func, ty = make_kernel(lambda *t, c0=c0: _pointwise_grad_rows(*t, c0, step, d_shape),
                               d_clamped.args, fused_accumulator)
        g_d = ctx.emit(relax.call_tir(ctx.add_func(func, "qgrad_through_rows"), d_clamped.args, ty))
        g_e = ctx.emit_te(lambda gd, wd, c0=c0: _qconv_input_grad(
            q_d, lambda nn, oc, oy, ox: gd[nn, oc - c0, oy, ox], [], d_shape[2:], wd, out_shape, (c0, step)),
            g_d, w_d, primfunc_name_hint="qconv_input_grad_chunk")
        bias, weight, g_x = _expansion_chunk(ctx, q, x, w, mask, multiplier, g_e, c0, out_shape, g_x)
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
    mask = _clamp_mask(ctx, orig_var, q.lo, q.hi)
    g_a = _grad_through_clamp(ctx, mask, output_grad, _f32(ones * q.sa / q.sy), 1)
    g_b = _grad_through_clamp(ctx, mask, output_grad, _f32(ones * q.sb / q.sy), 1)
    return ctx.emit(relax.Tuple([g_a, g_b]))

def _qavgpool_grad(orig_var, call, output_grad, ctx):
    q = QPoolParams.from_kwargs(_kw(call))
    (x,) = call.args[1]
    ones = np.ones(int(orig_var.ty.shape[1]))
    g = _grad_through_clamp(ctx, _clamp_mask(ctx, orig_var, q.lo, q.hi), output_grad, _f32(ones), 1)
    n, c, h, w = (int(d) for d in x.ty.shape)
    _, _, oh, ow = (int(d) for d in orig_var.ty.shape)
    kh, kw = q.pool
    if _is_global_window((h, w), (oh, ow), q.padding) and (kh, kw) == (h, w):
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

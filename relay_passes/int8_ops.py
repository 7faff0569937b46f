"""Quantized operators as TIR kernels with their gradients, for int8 backbones.

Each quantized op is one ``R.call_tir_with_grad`` to a TE kernel: int8
activations in and out, int32 accumulation, and the requantization fused into
the kernel (the int32 accumulator is one scalar per output element, never a
tensor). The arithmetic is TFLite's reference integer arithmetic (the
fixed-point multiplier with its two roundings), so a model imported from an int8
``.tflite`` computes what the TFLite interpreter computes::

    y = R.call_tir_with_grad(qconv, (x, w, b, mult, shift), R.Tensor((1, 16, 48, 48), "int8"),
                             te_grad_name="tinytrain_qconv",
                             te_grad_kwargs={"strides": [2, 2], "zx": -128, "zy": -128, ...})

The gradient treats each op as a real function of its integer values
(``DESIGN.md``, int8 semantics): rounding passes the gradient straight through,
clamped outputs pass none, and the result is float32. For a conv,
``acc = Σ (x − zx)·w + b`` and ``y = clamp(round(M·acc) + zy)`` with
``M = s_x·s_w / s_y`` per output channel, so ``∂L/∂acc = [lo < y < hi]·M·∂L/∂y``,
``∂L/∂w = Σ (x − zx)·∂L/∂acc`` (read from the saved int8 input, never a float
copy of it), ``∂L/∂b = Σ ∂L/∂acc`` and ``∂L/∂x`` the transposed conv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, te, tirx
from tvm.relax import op as R
from tvm.relax.expr_functor import PyExprMutator, mutator

GRAD_PREFIX = "tvm.relax.te_grad._register."
QOPS = ("tinytrain_qconv", "tinytrain_qlinear", "tinytrain_qadd", "tinytrain_qavgpool",
        "tinytrain_dequantize")
WEIGHT_GRADS = ("tinytrain_qconv_weight_grad", "tinytrain_qlinear_weight_grad")  # tagged, for fusion


# ---- TFLite's fixed-point arithmetic --------------------------------------------
def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real ≈ mult · 2^(shift − 31)``, mult in [2^30, 2^31): TFLite's QuantizeMultiplier."""
    if real == 0:
        return 0, 0
    frac, shift = math.frexp(real)
    mult = round(frac * (1 << 31))
    if mult == 1 << 31:
        mult //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(mult), int(shift)


def _i64(v) -> tirx.PrimExpr:
    return tirx.const(v, "int64") if isinstance(v, int) else v.astype("int64")


def multiply_by_quantized_multiplier(x, mult, shift) -> tirx.PrimExpr:
    """TFLite's MultiplyByQuantizedMultiplier on an int32 value, computed in int64:
    SaturatingRoundingDoublingHighMul then RoundingDivideByPOT (round half away).
    A Python-int ``shift`` (per-tensor) folds the shift arithmetic into constants."""
    zero, one = tirx.const(0, "int64"), tirx.const(1, "int64")
    if isinstance(shift, int) and isinstance(mult, int):
        ab = _i64(x) * tirx.const(mult << max(shift, 0), "int64")
        right = tirx.const(max(-shift, 0), "int64")
        mask = tirx.const((1 << max(-shift, 0)) - 1, "int64")
        half_mask = tirx.const(((1 << max(-shift, 0)) - 1) >> 1, "int64")
    else:
        x, mult, shift = _i64(x), _i64(mult), _i64(shift)
        ab = (x << tirx.max(shift, zero)) * mult
        right = tirx.max(-shift, zero)
        mask = (one << right) - one
        half_mask = mask >> one
    nudge = tirx.Select(ab >= zero, tirx.const(1 << 30, "int64"), tirx.const(1 - (1 << 30), "int64"))
    high = tirx.truncdiv(ab + nudge, tirx.const(1 << 31, "int64"))
    threshold = half_mask + tirx.Select(high < zero, one, zero)
    return (high >> right) + tirx.Select(tirx.bitwise_and(high, mask) > threshold, one, zero)


def multiply_single_rounding(x, mult, shift) -> tirx.PrimExpr:
    """``x·mult·2^(shift−31)`` rounded once, half up: what TFLite's reference int8 fully
    connected kernel computes (its conv kernels round twice, as above)."""
    x, mult = _i64(x), _i64(mult)
    total = tirx.const(31, "int64") - _i64(shift)
    one = tirx.const(1, "int64")
    return (x * mult + (one << (total - one))) >> total


def _clamp_int8(v, zy: int, lo: int, hi: int) -> tirx.PrimExpr:
    v = v + tirx.const(zy, "int64")
    return tirx.max(tirx.min(v, tirx.const(hi, "int64")), tirx.const(lo, "int64")).astype("int8")


# ---- the quantization of one op -----------------------------------------------
@dataclass(frozen=True)
class QConvParams:
    """A quantized conv or linear layer: scales, zero points, output clamp, geometry."""

    sx: float
    zx: int
    sw: tuple[float, ...]  # per output channel
    sy: float
    zy: int
    lo: int = -128
    hi: int = 127
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    groups: int = 1
    mult: tuple[int, ...] = field(default=(), compare=False)
    shift: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if not self.mult:  # TFLite derives the multiplier from float32 scales
            pairs = [quantize_multiplier(float(np.float64(np.float32(self.sx)) * np.float32(s)
                                               / np.float64(np.float32(self.sy))))
                     for s in self.sw]
            object.__setattr__(self, "mult", tuple(p[0] for p in pairs))
            object.__setattr__(self, "shift", tuple(p[1] for p in pairs))

    @property
    def real_multiplier(self) -> np.ndarray:
        return np.asarray(self.sw, np.float64) * self.sx / self.sy

    def channels(self, begin: int, end: int) -> QConvParams:
        return replace(self, sw=self.sw[begin:end], mult=self.mult[begin:end],
                       shift=self.shift[begin:end])

    def kwargs(self) -> dict:
        return {"sx": self.sx, "zx": self.zx, "sw": [float(s) for s in self.sw], "sy": self.sy,
                "zy": self.zy, "lo": self.lo, "hi": self.hi, "strides": list(self.strides),
                "padding": list(self.padding), "groups": self.groups,
                "mult": list(self.mult), "shift": list(self.shift)}

    @staticmethod
    def from_kwargs(kw) -> QConvParams:
        ints = lambda key: tuple(int(v) for v in kw[key])  # noqa: E731
        return QConvParams(float(kw["sx"]), int(kw["zx"]), tuple(float(s) for s in kw["sw"]),
                           float(kw["sy"]), int(kw["zy"]), int(kw["lo"]), int(kw["hi"]),
                           ints("strides"), ints("padding"), int(kw["groups"]),
                           ints("mult"), ints("shift"))


def _kw(call: relax.Call) -> dict:
    return {str(k): v for k, v in call.attrs.te_grad_kwargs.items()}


def qop_name(value) -> str | None:
    """The quantized op a binding's value calls (``tinytrain_qconv``, ...), or None."""
    if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir_with_grad"):
        name = str(value.attrs.te_grad_name)
        return name if name in QOPS else None
    return None


def qconv_params(call: relax.Call) -> QConvParams:
    return QConvParams.from_kwargs(_kw(call))


# ---- kernels ----------------------------------------------------------------------
def _conv_out(size: int, k: int, stride: int, before: int, after: int) -> int:
    return (size + before + after - k) // stride + 1


def fused_accumulator(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Move every block that feeds the output block ``y`` under y's innermost loop: the
    int32 accumulators become one scalar each, never a tensor."""
    sch = s_tir.Schedule(func)
    output = sch.get_sblock("y")
    depth = len(sch.get_loops(output))
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint != "y":
            sch.compute_at(block, sch.get_loops(output)[-1])
            loops = sch.get_loops(block)
            if sch.get(block).init is not None and len(loops) > depth:
                # the zeroing before the reduction loop, not inside it (which C compilers
                # take for a maybe-uninitialized read)
                sch.decompose_reduction(block, loops[depth])
    return sch.mod["main"]


def make_kernel(te_func, args: list, schedule=None) -> tuple[tirx.PrimFunc, relax.TensorType]:
    """``te_func`` over placeholders shaped like the Relax ``args``, as a PrimFunc."""
    placeholders = [te.placeholder([int(d) for d in a.ty.shape], str(a.ty.dtype), f"in{i}")
                    for i, a in enumerate(args)]
    out = te_func(*placeholders)
    func = te.create_prim_func([*placeholders, out]).without_attr("global_symbol")
    if schedule is not None:  # and keep it: inlining the stages back would undo it
        func = schedule(func).with_attr("tinytrain.scheduled", True)
    return func, relax.TensorType([int(d) for d in out.shape], out.dtype)


def _emit_kernel(bb: relax.BlockBuilder, te_func, args: list, grad: str, kwargs: dict,
                 schedule=None, name: str = "") -> relax.Var:
    """``te_func(*tensors)`` as a PrimFunc in the module, called with a gradient."""
    func, out_ty = make_kernel(te_func, args, schedule)
    gv = bb.add_func(func, name or grad.removeprefix("tinytrain_"))
    return bb.emit(relax.call_tir_with_grad(gv, args, out_ty, grad, kwargs))


def emit_tagged_kernel(bb: relax.BlockBuilder, te_func, args: list, tag: str, kwargs: dict) -> relax.Var:
    """A plain ``call_tir`` whose PrimFunc carries ``tinytrain.kernel`` (the tag) and
    ``tinytrain.kwargs``: what FuseWeightUpdate reads (Gradient turns the calls it emits
    into plain ``call_tir``, so the tag lives on the kernel)."""
    func, out_ty = make_kernel(te_func, args)
    func = func.with_attrs({"tinytrain.kernel": tag, "tinytrain.kwargs": kwargs})
    gv = bb.add_func(func, tag.removeprefix("tinytrain_"))
    return bb.emit(relax.call_tir(gv, args, out_ty))


def kernel_tag(mod: tvm.IRModule, value) -> tuple[str | None, dict]:
    """(tag, kwargs) of a ``call_tir`` to a kernel made by :func:`emit_tagged_kernel`."""
    if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir"):
        attrs = mod[value.args[0]].attrs
        if attrs is not None and "tinytrain.kernel" in attrs:
            return str(attrs["tinytrain.kernel"]), {str(k): v for k, v in attrs["tinytrain.kwargs"].items()}
    return None, {}


def _channel_consts(q: QConvParams) -> list[relax.Constant]:
    return [relax.const(np.asarray(q.mult, np.int32)), relax.const(np.asarray(q.shift, np.int32))]


def qconv_te(q: QConvParams, x, w, b, mult, shift):
    n, c, h, wd = (int(d) for d in x.shape)
    o, i_g, kh, kw = (int(d) for d in w.shape)
    (sh, sw), (pt, pl, pb, pr) = q.strides, q.padding
    oh, ow = _conv_out(h, kh, sh, pt, pb), _conv_out(wd, kw, sw, pl, pr)
    per_group = o // q.groups
    rc, ry, rx = te.reduce_axis((0, i_g), "rc"), te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def x_minus_zero(nn, cc, hh, ww):
        inside = tirx.all(hh >= 0, hh < h, ww >= 0, ww < wd)
        value = x[nn, cc, tirx.max(tirx.min(hh, h - 1), 0), tirx.max(tirx.min(ww, wd - 1), 0)]
        return tirx.Select(inside, value.astype("int32") - q.zx, tirx.const(0, "int32"))

    acc = te.compute(
        (n, o, oh, ow),
        lambda nn, oo, yy, xx: te.sum(
            x_minus_zero(nn, (oo // per_group) * i_g + rc, yy * sh + ry - pt, xx * sw + rx - pl)
            * w[oo, rc, ry, rx].astype("int32"), axis=[rc, ry, rx]),
        name="acc")
    return te.compute(
        (n, o, oh, ow),
        lambda nn, oo, yy, xx: _clamp_int8(
            multiply_by_quantized_multiplier(acc[nn, oo, yy, xx] + b[oo], mult[oo], shift[oo]),
            q.zy, q.lo, q.hi),
        name="y")


def emit_qconv(bb, x, w, b, q: QConvParams) -> relax.Var:
    """``y = requant(conv2d(x − zx, w) + b)``: x NCHW int8, w OIHW int8, b int32."""
    return _emit_kernel(bb, lambda *t: qconv_te(q, *t), [x, w, b, *_channel_consts(q)],
                        "tinytrain_qconv", q.kwargs(), fused_accumulator)


def qlinear_te(q: QConvParams, x, w, b, mult, shift):
    n, k = (int(d) for d in x.shape)
    o = int(w.shape[0])
    r = te.reduce_axis((0, k), "r")
    acc = te.compute((n, o), lambda i, j: te.sum(
        (x[i, r].astype("int32") - q.zx) * w[j, r].astype("int32"), axis=r), name="acc")
    return te.compute((n, o), lambda i, j: _clamp_int8(
        multiply_single_rounding(acc[i, j] + b[j], mult[j], shift[j]), q.zy, q.lo, q.hi),
        name="y")


def emit_qlinear(bb, x, w, b, q: QConvParams) -> relax.Var:
    """``y = requant(x·wᵀ + b)``: x (N, K) int8, w (O, K) int8, b int32."""
    return _emit_kernel(bb, lambda *t: qlinear_te(q, *t), [x, w, b, *_channel_consts(q)],
                        "tinytrain_qlinear", q.kwargs(), fused_accumulator)


@dataclass(frozen=True)
class QAddParams:
    """TFLite's int8 ADD: both inputs moved to a common scale 2·max(s_a, s_b) with 20 bits
    of headroom, summed, then requantized to the output."""

    sa: float
    za: int
    sb: float
    zb: int
    sy: float
    zy: int
    lo: int = -128
    hi: int = 127

    def multipliers(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        sa, sb, sy = (np.float64(np.float32(v)) for v in (self.sa, self.sb, self.sy))
        twice_max = 2 * max(sa, sb)
        return (quantize_multiplier(sa / twice_max), quantize_multiplier(sb / twice_max),
                quantize_multiplier(twice_max / ((1 << 20) * sy)))

    def kwargs(self) -> dict:
        return {k: getattr(self, k) for k in ("sa", "za", "sb", "zb", "sy", "zy", "lo", "hi")}

    @staticmethod
    def from_kwargs(kw) -> QAddParams:
        return QAddParams(float(kw["sa"]), int(kw["za"]), float(kw["sb"]), int(kw["zb"]),
                          float(kw["sy"]), int(kw["zy"]), int(kw["lo"]), int(kw["hi"]))


def qadd_te(q: QAddParams, a, b):
    (ma, sa), (mb, sb), (mo, so) = q.multipliers()

    def scaled(v, zero, mult, shift, name):  # its own stage: nested requantizations
        return te.compute(v.shape, lambda *i: multiply_by_quantized_multiplier(  # stay small
            (v[i].astype("int64") - zero) * (1 << 20), mult, shift).astype("int32"), name=name)

    a_scaled, b_scaled = scaled(a, q.za, ma, sa, "acc_a"), scaled(b, q.zb, mb, sb, "acc_b")
    return te.compute(a.shape, lambda *i: _clamp_int8(
        multiply_by_quantized_multiplier(a_scaled[i] + b_scaled[i], mo, so), q.zy, q.lo, q.hi),
        name="y")


def emit_qadd(bb, a, b, q: QAddParams) -> relax.Var:
    return _emit_kernel(bb, lambda *t: qadd_te(q, *t), [a, b], "tinytrain_qadd", q.kwargs(),
                        fused_accumulator)


@dataclass(frozen=True)
class QPoolParams:
    """TFLite's int8 AVERAGE_POOL_2D: the mean of the valid window, rounded half away
    from zero; input and output share one quantization."""

    pool: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    lo: int = -128
    hi: int = 127

    def kwargs(self) -> dict:
        return {"pool": list(self.pool), "strides": list(self.strides),
                "padding": list(self.padding), "lo": self.lo, "hi": self.hi}

    @staticmethod
    def from_kwargs(kw) -> QPoolParams:
        ints = lambda key: tuple(int(v) for v in kw[key])  # noqa: E731
        return QPoolParams(ints("pool"), ints("strides"), ints("padding"), int(kw["lo"]), int(kw["hi"]))

    def out_shape(self, shape) -> tuple[int, ...]:
        n, c, h, w = shape
        (kh, kw), (sh, sw), (pt, pl, pb, pr) = self.pool, self.strides, self.padding
        return (n, c, _conv_out(h, kh, sh, pt, pb), _conv_out(w, kw, sw, pl, pr))


def _window(q: QPoolParams, h: int, w: int, yy, xx):
    """First row/col of an output's window and how many of its rows/cols are inside."""
    (kh, kw), (sh, sw), (pt, pl, _, _) = q.pool, q.strides, q.padding
    y0, x0 = yy * sh - pt, xx * sw - pl
    rows = tirx.min(y0 + kh, h) - tirx.max(y0, 0)
    cols = tirx.min(x0 + kw, w) - tirx.max(x0, 0)
    return y0, x0, rows * cols


def qavgpool_te(q: QPoolParams, x):
    n, c, h, w = (int(d) for d in x.shape)
    (kh, kw) = q.pool
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")

    def inside_value(nn, cc, yy, xx):
        ok = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        v = x[nn, cc, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
        return tirx.Select(ok, v.astype("int32"), tirx.const(0, "int32"))

    def origin(yy, xx):
        return _window(q, h, w, yy, xx)[:2]

    acc = te.compute(q.out_shape((n, c, h, w)), lambda nn, cc, yy, xx: te.sum(
        inside_value(nn, cc, origin(yy, xx)[0] + ry, origin(yy, xx)[1] + rx), axis=[ry, rx]),
        name="acc")

    def body(nn, cc, yy, xx):
        count = _window(q, h, w, yy, xx)[2]
        s = acc[nn, cc, yy, xx]
        half = tirx.truncdiv(count, 2)
        mean = tirx.Select(s > 0, tirx.truncdiv(s + half, count), tirx.truncdiv(s - half, count))
        return tirx.max(tirx.min(mean, q.hi), q.lo).astype("int8")

    return te.compute(acc.shape, body, name="y")


def emit_qavgpool(bb, x, q: QPoolParams) -> relax.Var:
    return _emit_kernel(bb, lambda t: qavgpool_te(q, t), [x], "tinytrain_qavgpool", q.kwargs(),
                        fused_accumulator)


def emit_dequantize(bb, x, scale: float, zero: int) -> relax.Var:
    """``(x − zero)·scale`` in float32: where the int8 graph hands over to float."""
    def body(t):
        return te.compute(t.shape, lambda *i: (t[i].astype("int32") - zero).astype("float32")
                          * tirx.const(scale, "float32"), name="y")
    return _emit_kernel(bb, body, [x], "tinytrain_dequantize", {"scale": float(scale), "zero": int(zero)})


# ---- gradients --------------------------------------------------------------------
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


ROUNDINGS = ("stochastic", "nearest")


def _flat_index(shape, index) -> tirx.PrimExpr:
    flat = index[0]
    for size, i in zip(shape[1:], index[1:]):
        flat = flat * int(size) + i
    return flat


def integer_step(w, delta, index, shape, lo: float, hi: float, rounding: str) -> tirx.PrimExpr:
    """``w − delta`` back in w's integer type, clipped to [lo, hi].

    ``nearest`` rounds half away from zero: a step under half a unit is lost.
    ``stochastic`` (the default for training) takes ``floor(w − delta + u)`` with
    ``u ∈ [0, 1)`` from an integer hash of the element's index and of delta's bits, so
    the expected update is the float update however small; it is reproducible bit for
    bit on every target (no random state).
    """
    value = w.astype("float32") - delta
    if rounding == "nearest":
        new = tirx.round(value)
    else:
        def u32(v):
            return tirx.const(v, "uint32")

        h = tirx.reinterpret("uint32", delta) ^ (_flat_index(shape, index).astype("uint32") * u32(0x9E3779B9))
        h = h ^ (h >> u32(16))
        h = h * u32(0x7FEB352D)
        h = h ^ (h >> u32(15))
        h = h * u32(0x846CA68B)
        h = h ^ (h >> u32(16))
        uniform = (h >> u32(8)).astype("float32") * tirx.const(1.0 / (1 << 24), "float32")
        new = tirx.floor(value + uniform)
    return tirx.max(tirx.min(new, tirx.const(hi, "float32")), tirx.const(lo, "float32")).astype(w.dtype)


def fused_weight_update(kind: str, q: QConvParams, x, g, w, factor, lo: float, hi: float,
                        rounding: str = "stochastic"):
    """``w − factor[o]·∂L/∂w`` back in w's integer type (:func:`integer_step`), the gradient summed into one
    scalar per weight: the weight gradient never exists as a tensor (the paper's in-place
    update). ``kind`` is the weight gradient's tag."""
    if kind == "tinytrain_qconv_weight_grad":
        grad = _qconv_weight_grad(q, x, g, [int(d) for d in w.shape])
    else:
        grad = _qlinear_weight_grad(q, x, g)

    def body(*i):
        return integer_step(w[i], factor[i[0]] * grad[i], i, w.shape, lo, hi, rounding)

    return te.compute(w.shape, body, name="y")


# ---- after differentiation --------------------------------------------------------
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

"""Quantized operators as TIR kernels, for int8 backbones.

Each quantized op is one ``R.call_tir_with_grad`` to a TE kernel: int8
activations in and out, int32 accumulation, and the requantization fused into
the kernel (the int32 accumulator is one scalar per output element, never a
tensor). The arithmetic is TFLite's reference integer arithmetic (the
fixed-point multiplier with its two roundings), so a model imported from an int8
``.tflite`` computes what the TFLite interpreter computes::

    y = R.call_tir_with_grad(qconv, (x, w, b, mult, shift), R.Tensor((1, 16, 48, 48), "int8"),
                             te_grad_name="tinytrain_qconv",
                             te_grad_kwargs={"strides": [2, 2], "zx": -128, "zy": -128, ...})

Their gradients are in ``int8_grads``; the arithmetic in ``int8_arith``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx

from .int8_arith import (
    _clamp_int8,
    multiply_by_quantized_multiplier,
    multiply_single_rounding,
    quantize_multiplier,
    saturating_bias_add,
)

QOPS = ("tinytrain_qconv", "tinytrain_qlinear", "tinytrain_qadd", "tinytrain_qavgpool",
        "tinytrain_dequantize")

# the forward kernels tagged ``tinytrain.qop``, with the kwargs their TE body bakes in as
# ``tinytrain.qkwargs`` (not the scales and multipliers: layers that differ only there still share
# one kernel)
HAND_KERNEL_OPS = ("tinytrain_qconv", "tinytrain_qlinear")
HAND_KERNEL_KWARGS = ("zx", "zy", "lo", "hi", "strides", "padding", "groups")

WEIGHT_GRADS = ("tinytrain_qconv_weight_grad", "tinytrain_qlinear_weight_grad")  # tagged, for fusion


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
    if grad in HAND_KERNEL_OPS:  # what codegen/s8_kernels.py reads to call a C kernel instead
        func = func.with_attrs({"tinytrain.qop": grad,
                                "tinytrain.qkwargs": {k: kwargs[k] for k in HAND_KERNEL_KWARGS}})
    gv = bb.add_func(func, name or grad.removeprefix("tinytrain_"))
    return bb.emit(relax.call_tir_with_grad(gv, args, out_ty, grad, kwargs))

def emit_tagged_kernel(bb: relax.BlockBuilder, te_func, args: list, tag: str, kwargs: dict,
                       schedule=None, name: str = "") -> relax.Var:
    """A plain ``call_tir`` whose PrimFunc carries ``tinytrain.kernel`` (the tag) and
    ``tinytrain.kwargs``: what a later pass finds it by (FuseWeightUpdate, BiasFromThroughRows;
    Gradient turns the calls it emits into plain ``call_tir``, so the tag lives on the kernel)."""
    func, out_ty = make_kernel(te_func, args, schedule)
    func = func.with_attrs({"tinytrain.kernel": tag, "tinytrain.kwargs": kwargs})
    gv = bb.add_func(func, name or tag.removeprefix("tinytrain_"))
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
            multiply_by_quantized_multiplier(saturating_bias_add(acc[nn, oo, yy, xx], b[oo], shift[oo]),
                                             mult[oo], shift[oo]),
            q.zy, q.lo, q.hi),
        name="y")

def emit_qconv(bb, x, w, b, q: QConvParams, channel_consts: list | None = None) -> relax.Var:
    """``y = requant(conv2d(x − zx, w) + b)``: x NCHW int8, w OIHW int8, b int32;
    ``channel_consts``: the (multiplier, shift) constants of a layer already emitted."""
    consts = list(channel_consts) if channel_consts is not None else _channel_consts(q)
    return _emit_kernel(bb, lambda *t: qconv_te(q, *t), [x, w, b, *consts],
                        "tinytrain_qconv", q.kwargs(), fused_accumulator)

def qlinear_te(q: QConvParams, x, w, b, mult, shift):
    n, k = (int(d) for d in x.shape)
    o = int(w.shape[0])
    r = te.reduce_axis((0, k), "r")
    acc = te.compute((n, o), lambda i, j: te.sum(
        (x[i, r].astype("int32") - q.zx) * w[j, r].astype("int32"), axis=r), name="acc")
    return te.compute((n, o), lambda i, j: _clamp_int8(
        multiply_single_rounding(saturating_bias_add(acc[i, j], b[j]), mult[j], shift[j]), q.zy, q.lo, q.hi),
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
            (v[i].astype("int32") - zero) * (1 << 20), mult, shift), name=name)

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

"""The TE kernels of the int8 gradients (``int8_grads`` emits them): packed clamp masks,
the conv / depthwise / linear weight and input gradients over int8 values, and the
pieces of a bottleneck's gradient made in channel chunks. Pure TE: no Relax here.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, te, tirx

from .int8_arith import flat_index
from .int8_ops import QConvParams

ROWS_WEIGHT_GRAD = "tinytrain_qconv_weight_grad_rows"  # tagged, for FuseWeightUpdate
# tagged, for BiasFromThroughRows: a depthwise layer's bias gradient read through the 1×1
# projection after it, and the chunks of the same clamped gradient its expansion's backward makes
THROUGH_BIAS = "tinytrain_qconv_bias_grad_through"
THROUGH_ROWS = "tinytrain_qgrad_through_rows"


def unravel(shape, flat):
    out = []
    for d in reversed(shape):
        out.append(tirx.floormod(flat, int(d)))
        flat = tirx.floordiv(flat, int(d))
    return tuple(reversed(out))

def pack_clamp_mask_te(y, lo: int | None, hi: int | None):
    """One bit per element of ``y``: ``lo < y < hi`` (the output was not clamped; a bound
    of None is one the op cannot reach), eight elements per byte, element ``k`` in bit
    ``k % 8`` of byte ``k // 8``."""
    shape = [int(d) for d in y.shape]
    count = int(np.prod(shape))

    def byte(j):
        total = tirx.const(0, "int32")
        for b in range(8):
            k = j * 8 + b
            v = y[unravel(shape, tirx.min(k, count - 1))].astype("int32")
            inside = tirx.all(k < count,
                              *([v > tirx.const(lo, "int32")] if lo is not None else []),
                              *([v < tirx.const(hi, "int32")] if hi is not None else []))
            total = total + tirx.Select(inside, tirx.const(1 << b, "int32"), tirx.const(0, "int32"))
        return total.astype("uint8")

    return te.compute(((count + 7) // 8,), byte, name="mask")

def mask_bit(mask, k):
    """Bit ``k`` of a packed mask, as a condition: ``byte[k // 8] & (1 << k % 8) != 0``.

    The index is split with floordiv / floormod, which TVM's simplifier folds through the
    flat index (``(16·c + 4·y + x) % 8`` → ``(y & 1)·4 + x``, invariant in c); the bit is
    tested with an and (not ``floordiv(byte, 1 << bit)``, which TVM lowers to an int64
    division: a library call per element on a 32-bit core; not ``(byte >> bit) & 1 == 1``,
    which TVM 0.27's simplifier folded to false inside a transposed conv's bounds branch
    with int64 indices)."""
    k = k.astype("int32")
    byte = mask[tirx.floordiv(k, 8)].astype("int32")
    bit = tirx.shift_left(tirx.const(1, "int32"), tirx.floormod(k, 8))
    return tirx.bitwise_and(byte, bit) != tirx.const(0, "int32")

def masked(mask, shape, index, value):
    """``value`` where bit ``flat_index(shape, index)`` of the packed mask is set (the
    output at ``index`` did not clamp), else 0."""
    return tirx.Select(mask_bit(mask, flat_index(shape, index)), value, tirx.const(0, "float32"))

def spread_te(g, w, shape):
    """``g[n, c, 0, 0] · w[c, 0, h, w]``: the input gradient of a pool over the whole
    image (``w`` the pool's weights, one row for all channels when it has one)."""
    rows = int(w.shape[0])
    return te.compute(shape, lambda n, c, yy, xx: g[n, c, 0, 0] * w[
        c if rows > 1 else 0, 0, yy, xx].astype("float32"), name="g_x")

def is_global_window(in_hw, out_hw, padding) -> bool:
    return tuple(out_hw) == (1, 1) and not any(padding) and min(in_hw) > 1

def qconv_weight_grad_te(q: QConvParams, x, g, w_shape):
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

def pointwise_weight_grad_te(q: QConvParams, x, g):
    """:func:`qconv_weight_grad_te` of a 1×1 conv (stride 1, no padding): ``Σ_{n, h, w}
    g[n, o, h, w] · (x[n, i, h, w] − zx)``, with ``x − zx`` a float stage ``xf`` that
    :func:`input_channel_outer` makes one input channel at a time."""
    n, c, h, wd = (int(d) for d in x.shape)
    xf = te.compute((n, c, h, wd), lambda *i: x[i].astype("float32") - tirx.const(q.zx, "float32"), name="xf")
    rn, ry, rx = te.reduce_axis((0, n), "rn"), te.reduce_axis((0, h), "ry"), te.reduce_axis((0, wd), "rx")
    return te.compute((int(g.shape[1]), c, 1, 1), lambda oo, ii, ky, kx: te.sum(
        g[rn, oo, ry, rx] * xf[rn, ii, ry, rx], axis=[rn, ry, rx]), name="g_w")

def input_channel_outer(func):
    """A fused update ``y`` of a :func:`pointwise_weight_grad_te` weight one input channel
    at a time: ``for i: xf[i] (H·W floats of scratch), for o in steps of 4: 4 sums over
    (h, w) side by side, then y[o .. o + 4, i] = step(Σ …)``, each input value converted
    once, not once per output channel, and loaded once per 4 sums; each sum one scalar, its
    terms in their order."""
    sch = s_tir.Schedule(func)
    y = sch.get_sblock("y")
    oo, ii, *_ = sch.get_loops(y)
    sch.reorder(ii, oo)
    g_w = sch.get_sblock("g_w")
    factor = next(f for f in (4, 2, 1) if int(sch.get(oo).extent) % f == 0)
    if factor > 1:
        outer, _ = sch.split(oo, [None, factor])
        sch.compute_at(g_w, outer)
        inner = _loops_after(sch, g_w, outer)  # (o_i, the reduction's loops TIR kept)
        sch.decompose_reduction(g_w, inner[0])
        update = _loops_after(sch, g_w, outer)
        if len(update) > 1:
            sch.reorder(*update[1:], update[0])
    else:
        sch.compute_at(g_w, sch.get_loops(y)[-1])
        inner = _loops_after(sch, g_w, sch.get_loops(y)[-1])
        if inner:  # none on a 1×1 map: the sum has one term
            sch.decompose_reduction(g_w, inner[0])
    sch.compute_at(sch.get_sblock("xf"), sch.get_loops(y)[0])
    return sch.mod["main"]

def _loops_after(sch, block, loop) -> list:
    """The loops of ``block`` nested inside ``loop``."""
    target = sch.get(loop)
    loops = sch.get_loops(block)
    return list(loops[next(i for i, rv in enumerate(loops) if sch.get(rv).same_as(target)) + 1:])

def qconv_input_grad_te(q: QConvParams, g_at, axes: list, out_hw, w, x_shape, channels=None):
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

def is_depthwise(q: QConvParams, w_shape, channels: int) -> bool:
    return q.groups == channels == w_shape[0] and w_shape[1] == 1

def depthwise_input_grad_te(q: QConvParams, g_at, out_hw, w, x_shape, channels=None):
    """:func:`qconv_input_grad_te` of a depthwise conv over ``gpad``, the output gradient
    of one channel zero-padded (and zero-dilated for a stride) so that the multiply-add loop
    tests no bound and no stride; ``gpad`` is a stage the schedule makes one channel at a
    time ((H + kh − 1)·(W + kw − 1) floats of scratch, each output-gradient value read
    once, not kh·kw times). A term outside the output adds 0·w where the plain loop adds
    0: the same sums, in the same order."""
    n, c, h, wd = x_shape
    c0, c = channels if channels is not None else (0, c)
    kh, kw = (int(d) for d in w.shape[2:])
    oh, ow = out_hw
    (sh, sw), (pt, pl, _, _) = q.strides, q.padding

    def padded(nn, cc, u, v):
        ty, tx = u + pt - (kh - 1), v + pl - (kw - 1)
        oy, ox = tirx.floordiv(ty, sh), tirx.floordiv(tx, sw)
        valid = tirx.all(ty >= 0, tx >= 0, tirx.floormod(ty, sh) == 0, tirx.floormod(tx, sw) == 0,
                         oy < oh, ox < ow)
        value = g_at(nn, cc + c0, tirx.max(tirx.min(oy, oh - 1), 0), tirx.max(tirx.min(ox, ow - 1), 0))
        return tirx.if_then_else(valid, value, tirx.const(0.0, "float32"))

    gpad = te.compute((n, c, h + kh - 1, wd + kw - 1), padded, name="gpad")
    ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
    return te.compute((n, c, h, wd), lambda nn, cc, yy, xx: te.sum(
        gpad[nn, cc, yy + kh - 1 - ry, xx + kw - 1 - rx] * w[cc + c0, 0, ry, rx].astype("float32"),
        axis=[ry, rx]), name="g_x")

def padded_channels(func):
    """A :func:`depthwise_input_grad_te` one channel at a time: ``gpad`` made per channel
    (under the channel loop of the output ``y`` when there is a stage after the sum, the
    sum then one scalar per output)."""
    sch = s_tir.Schedule(func)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "y" in names:
        out = sch.get_sblock("y")
        g_x = sch.get_sblock("g_x")
        sch.compute_at(g_x, sch.get_loops(out)[-1])
        loops = sch.get_loops(g_x)
        sch.decompose_reduction(g_x, loops[len(sch.get_loops(out))])
    else:
        out = sch.get_sblock("g_x")
    sch.compute_at(sch.get_sblock("gpad"), sch.get_loops(out)[1])
    return sch.mod["main"]

def pointwise_input_grad_te(g, w, x_shape, row0: int = 0, acc=None):
    """``Σ_o g[n, o, h, w] · w[o + row0, c]`` (``+ acc`` when given): a 1×1 conv's input
    gradient from its output gradient ``g`` (a tensor or a stage), reading the int8 weight
    directly. Schedule it with :func:`input_channel_rows` or :func:`output_channel_outer`."""
    ro = te.reduce_axis((0, int(g.shape[1])), "ro")
    # the weight as float: a stage the schedules make a few values at a time, in a local the
    # C compiler keeps in registers (an int8 load may alias the float stores of the sum)
    wf = te.compute((int(g.shape[1]), x_shape[1]), lambda o, c: w[o + row0, c, 0, 0].astype("float32"),
                    name="wf")
    part = te.compute(x_shape, lambda nn, cc, yy, xx: te.sum(g[nn, ro, yy, xx] * wf[ro, cc], axis=ro),
                      name="g_x" if acc is None else "part")
    if acc is None:
        return part
    return te.compute(x_shape, lambda *i: acc[i] + part[i], name="y")

def _reduction_outside(sch, block, ro, inner: list):
    """Move the reduction loop ``ro`` outside the loops ``inner`` (its init before it), in
    steps of up to 8 iterations kept innermost: ``for ro_o: for inner: for ro_i < 8``, so the
    C compiler keeps each sum in a register over 8 terms (and the 8 weights of the step in
    registers) instead of loading and storing it at each; the terms of each sum still come
    in order. 8 rather than 4: about a fifth fewer instructions per multiply-add in the inner
    loop on Cortex-M7 (arm-none-eabi-gcc -O2: 123 for 32 terms against 77 for 16; the sum's
    load and store once per 8 terms). Returns the outer loop."""
    extent = int(sch.get(ro).extent)
    factor = next(f for f in (8, 4, 2, 1) if extent % f == 0)
    if factor > 1:
        ro, ro_inner = sch.split(ro, [None, factor])
        sch.reorder(ro, *inner, ro_inner)
    elif inner:
        sch.reorder(ro, *inner)
    sch.decompose_reduction(block, ro)
    return ro

def input_channel_rows(func):
    """A :func:`pointwise_input_grad_te` one input channel at a time: ``for c: for o: for
    (h, w)``, the weight read once per (c, o), the innermost loop contiguous over the
    output gradient's row; each sum still runs over ``o`` in order from 0 (the bits of the
    plain loop). With ``acc``, the channel's partial sums are H·W floats of scratch."""
    sch = s_tir.Schedule(func)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "y" in names:
        part = sch.get_sblock("part")
        channel = sch.get_loops(sch.get_sblock("y"))[1]
        sch.compute_at(part, channel)
        spatial, ro = _loops_inside(sch, part, channel)
        if ro is None:  # a chunk of one output channel: nothing to reorder
            sch.compute_at(sch.get_sblock("wf"), channel)
            return sch.mod["main"]
    else:
        part = sch.get_sblock("g_x")
        _, _, *spatial, ro = sch.get_loops(part)
    sch.compute_at(sch.get_sblock("wf"), _reduction_outside(sch, part, ro, spatial))
    return sch.mod["main"]

def output_channel_outer(func):
    """A :func:`pointwise_input_grad_te` over a stage ``ga`` (the clamped output gradient
    read through): ``for o: ga[o] (H·W floats of scratch), for (c, h, w): g_x += ga · w``,
    so each element of ``ga`` is made once, not once per input channel; each sum still
    runs over ``o`` in order from 0."""
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("g_x")
    _, cc, yy, xx, ro = sch.get_loops(block)
    sch.compute_at(sch.get_sblock("ga"), _reduction_outside(sch, block, ro, [cc, yy, xx]))
    sch.compute_at(sch.get_sblock("wf"), cc)
    return sch.mod["main"]

def is_pointwise(q: QConvParams, w_shape) -> bool:
    return w_shape[2:] == [1, 1] and q.groups == 1 and q.strides == (1, 1) and not any(q.padding)

def qlinear_weight_grad_te(q: QConvParams, x, g):
    r = te.reduce_axis((0, int(x.shape[0])), "r")
    return te.compute((int(g.shape[1]), int(x.shape[1])), lambda o, k: te.sum(
        g[r, o] * (x[r, k].astype("float32") - tirx.const(q.zx, "float32")), axis=r), name="g_w")

def rows_weight_grad(q: QConvParams, x, g):
    """The weight gradient of output channels ``c0 .. c0 + len(g)`` of a 1×1 conv, from its
    input and a chunk ``g`` of its clamped output gradient."""
    return pointwise_weight_grad_te(q, x, g)

def pointwise_grad_rows_te(mask, multiplier, g, w, c0: int, step: int, shape):
    """``[lo < y < hi] · M[c] · Σ_o g[n, o, h, w] · w[o, c]`` for channels ``c0 .. c0 + step`` of
    a layer's output (shape ``shape``) whose gradient comes from a 1×1 conv's input: that
    conv's narrow clamped gradient ``g`` and int8 weight ``w``."""
    n, _, h, wd = shape
    rp = te.reduce_axis((0, int(w.shape[0])), "rp")
    # (schedules: sums_per_channel, channel_at_a_time)
    wf = te.compute((int(w.shape[0]), step), lambda o, j: w[o, j + c0, 0, 0].astype("float32"), name="wf")
    total = te.compute((n, step, h, wd), lambda nn, j, yy, xx: te.sum(g[nn, rp, yy, xx] * wf[rp, j], axis=rp),
                       name="acc")

    return te.compute((n, step, h, wd), lambda nn, j, yy, xx: masked(
        mask, shape, (nn, j + c0, yy, xx), total[nn, j, yy, xx] * multiplier[j + c0]), name="y")

def _sums_over_rows(sch, acc, loop):
    """``acc`` (a :func:`pointwise_grad_rows_te` sum) made under ``loop`` (one channel):
    ``for o: for (h, w): acc += g[o] · w[o, c]``, H·W floats of scratch, the weight read
    once per (o, c), the innermost loop contiguous; each sum runs over ``o`` in order."""
    sch.compute_at(acc, loop)
    spatial, reduction = _loops_inside(sch, acc, loop)
    if reduction is None:  # one output channel: nothing to reorder
        sch.compute_at(sch.get_sblock("wf"), loop)
        return
    sch.compute_at(sch.get_sblock("wf"), _reduction_outside(sch, acc, reduction, spatial))


def _loops_inside(sch, block, loop) -> tuple[list, object]:
    """(spatial loops, reduction loop or None) of ``block`` nested inside ``loop``, after a
    ``compute_at``: TIR makes no loop of extent 1 (a 1×1 map, a chunk of one channel), and the
    reduction (TE's last axis) comes last."""
    inner = _loops_after(sch, block, loop)
    axis = sch.get(block).iter_vars[-1]
    if inner and int(axis.iter_type) == tirx.IterVar.CommReduce and int(axis.dom.extent) > 1:
        return inner[:-1], inner[-1]
    return inner, None

def channel_sums_te(y):
    """``Σ_{n, h, w} y[n, c, h, w]``: a bias gradient."""
    n, c, h, wd = (int(d) for d in y.shape)
    rn, ry, rx = (te.reduce_axis((0, d), f"r{i}") for i, d in enumerate((n, h, wd)))
    return te.compute((c,), lambda cc: te.sum(y[rn, cc, ry, rx], axis=[rn, ry, rx]), name="g_b")

def sums_per_channel(func):
    """:func:`pointwise_grad_rows_te` a channel at a time (:func:`_sums_over_rows`); under
    a :func:`channel_sums_te`, the channel's H·W values in scratch."""
    sch = s_tir.Schedule(func)
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "g_b" in names:
        channel = sch.get_loops(sch.get_sblock("g_b"))[0]
        sch.compute_at(sch.get_sblock("y"), channel)
        _sums_over_rows(sch, sch.get_sblock("acc"), sch.get_loops(sch.get_sblock("g_b"))[0])
    else:
        _sums_over_rows(sch, sch.get_sblock("acc"), sch.get_loops(sch.get_sblock("y"))[1])
    return sch.mod["main"]

def channel_at_a_time(func):
    """A depthwise input gradient (:func:`depthwise_input_grad_te`) whose output gradient is
    a stage (``y``, from the sum ``acc``): the stage made per channel, its H×W values in
    scratch, each value once."""
    sch = s_tir.Schedule(func)
    sch.compute_at(sch.get_sblock("gpad"), sch.get_loops(sch.get_sblock("g_x"))[1])
    sch.compute_at(sch.get_sblock("y"), sch.get_loops(sch.get_sblock("g_x"))[1])
    _sums_over_rows(sch, sch.get_sblock("acc"), sch.get_loops(sch.get_sblock("g_x"))[1])
    return sch.mod["main"]

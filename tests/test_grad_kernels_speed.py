"""The scheduled int8 backward kernels compute the bits of their plain loops.

The schedules of ``relay_passes.int8_grad_kernels`` only reorder loops and move stages
(``for c: for o: for (h, w)`` instead of ``for (c, h, w): for o``): every float sum still
runs over the same terms in the same order, so the result must equal the unscheduled
kernel's bit for bit, on shapes whose channel counts are not multiples of 2 or 4.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from relay_passes.int8_grad_kernels import (
    channel_at_a_time,
    channel_sums_te,
    depthwise_input_grad_te,
    input_channel_rows,
    masked,
    output_channel_outer,
    pack_clamp_mask_te,
    padded_channels,
    pointwise_grad_rows_te,
    pointwise_input_grad_te,
    qconv_input_grad_te,
    sums_per_channel,
)
from relay_passes.int8_ops import QConvParams


def _run(te_func, arrays: list[np.ndarray], schedule=None) -> np.ndarray:
    """``te_func`` over placeholders shaped like ``arrays``, built for the host (LLVM)."""
    holders = [te.placeholder(a.shape, str(a.dtype), f"in{i}") for i, a in enumerate(arrays)]
    out = te_func(*holders)
    func = te.create_prim_func([*holders, out])
    if schedule is not None:
        func = schedule(func)
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    result = tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], str(out.dtype)))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], result)
    return result.numpy()


def _mask(rng, shape) -> np.ndarray:
    """A packed clamp mask with about half its elements clamped."""
    return np.packbits(rng.random(int(np.prod(shape))) < 0.5, bitorder="little")


SHAPES = [(1, 7, 3, 5, 0), (1, 13, 5, 5, 0), (1, 6, 4, 3, 2), (2, 5, 3, 3, 0),  # (n, o, c, h·w side, row0)
          (1, 1, 3, 4, 2), (1, 8, 3, 1, 0)]  # a chunk of one output channel, a 1×1 map (VWW, MobileNetV2)


@pytest.mark.parametrize("n, o, c, side, row0", SHAPES)
def test_pointwise_input_grad_one_input_channel_at_a_time_is_bit_exact(n, o, c, side, row0):
    rng = np.random.default_rng(o * 10 + c)
    g = rng.standard_normal((n, o, side, side + 1)).astype(np.float32)
    w = rng.integers(-128, 128, (o + row0, c, 1, 1)).astype(np.int8)
    x_shape = (n, c, side, side + 1)
    plain = _run(lambda gt, wt: pointwise_input_grad_te(gt, wt, x_shape, row0), [g, w])
    rows = _run(lambda gt, wt: pointwise_input_grad_te(gt, wt, x_shape, row0), [g, w], input_channel_rows)
    np.testing.assert_array_equal(rows, plain)
    expected = np.einsum("nohw,oc->nchw", g.astype(np.float64), w[row0:, :, 0, 0].astype(np.float64))
    np.testing.assert_allclose(plain, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n, o, c, side, row0", SHAPES)
def test_pointwise_input_grad_added_to_a_running_sum_is_bit_exact(n, o, c, side, row0):
    rng = np.random.default_rng(o * 10 + c + 1)
    g = rng.standard_normal((n, o, side, side)).astype(np.float32)
    w = rng.integers(-128, 128, (o + row0, c, 1, 1)).astype(np.int8)
    acc = rng.standard_normal((n, c, side, side)).astype(np.float32)
    x_shape = (n, c, side, side)

    def body(gt, wt, at):
        return pointwise_input_grad_te(gt, wt, x_shape, row0, at)

    plain = _run(body, [g, w, acc])
    rows = _run(body, [g, w, acc], input_channel_rows)
    np.testing.assert_array_equal(rows, plain)
    alone = _run(lambda gt, wt: pointwise_input_grad_te(gt, wt, x_shape, row0), [g, w])
    np.testing.assert_allclose(rows, alone + acc, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("o, c, side", [(11, 3, 3), (9, 5, 2)])
def test_pointwise_input_grad_over_a_clamped_stage_one_output_channel_at_a_time_is_bit_exact(o, c, side):
    """The shape of a global pool's spread read through: the clamped gradient a stage."""
    rng = np.random.default_rng(o)
    out_shape = (1, o, side, side)
    mask = _mask(rng, out_shape)
    g = rng.standard_normal((1, o, 1, 1)).astype(np.float32)
    k = rng.random(o).astype(np.float32)
    w = rng.integers(-128, 128, (o, c, 1, 1)).astype(np.int8)

    def body(mt, gt, kt, wt):
        ga = te.compute(out_shape, lambda n, oc, y, x: masked(
            mt, out_shape, (n, oc, y, x), gt[n, oc, 0, 0] * kt[oc]), name="ga")
        return pointwise_input_grad_te(ga, wt, (1, c, side, side))

    plain = _run(body, [mask, g, k, w])
    outer = _run(body, [mask, g, k, w], output_channel_outer)
    np.testing.assert_array_equal(outer, plain)
    inside = np.unpackbits(mask, bitorder="little")[:o * side * side].reshape(out_shape).astype(bool)
    ga = np.where(inside, (g * k[None, :, None, None]).astype(np.float64), 0.0)
    np.testing.assert_allclose(plain, np.einsum("nohw,oc->nchw", ga, w[:, :, 0, 0].astype(np.float64)),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("channels, o, c0, step, side",  # 1×1 maps and one output channel: TIR drops
                         [(9, 5, 2, 5, 3), (6, 7, 0, 6, 4), (6, 7, 0, 6, 1), (5, 1, 1, 3, 2)])  # unit loops
def test_read_through_sums_one_channel_at_a_time_are_bit_exact(channels, o, c0, step, side):
    rng = np.random.default_rng(channels)
    shape = (1, channels, side, side)
    mask = _mask(rng, shape)
    k = rng.random(channels).astype(np.float32)
    g = rng.standard_normal((1, o, side, side)).astype(np.float32)
    w = rng.integers(-128, 128, (o, channels, 1, 1)).astype(np.int8)

    def body(mt, kt, gt, wt):
        return pointwise_grad_rows_te(mt, kt, gt, wt, c0, step, shape)

    plain = _run(body, [mask, k, g, w])
    np.testing.assert_array_equal(_run(body, [mask, k, g, w], sums_per_channel), plain)


@pytest.mark.parametrize("stride, side", [(1, 4), (2, 4), (1, 1)])  # side 1: MobileNetV2's last maps at 32×32
def test_depthwise_input_grad_through_a_projection_channel_at_a_time_is_bit_exact(stride, side):
    rng = np.random.default_rng(stride)
    channels, o = 5, 3
    out_shape = (1, channels, side, side)
    x_shape = [1, channels, side * stride, side * stride]
    q = QConvParams(0.1, 0, (0.01,) * channels, 0.1, 0, strides=(stride, stride), padding=(1, 1, 1, 1),
                    groups=channels)
    mask = _mask(rng, out_shape)
    k = rng.random(channels).astype(np.float32)
    g = rng.standard_normal((1, o, side, side)).astype(np.float32)
    wp = rng.integers(-128, 128, (o, channels, 1, 1)).astype(np.int8)
    wd = rng.integers(-128, 128, (channels, 1, 3, 3)).astype(np.int8)

    def body(transposed):
        def kernel(mt, kt, gt, wpt, wdt):
            gd = pointwise_grad_rows_te(mt, kt, gt, wpt, 0, channels, out_shape)
            return transposed(lambda *i: gd[i], wdt)
        return kernel

    plain = _run(body(lambda g_at, wdt: qconv_input_grad_te(q, g_at, [], (side, side), wdt, x_shape)),
                 [mask, k, g, wp, wd])
    fast = _run(body(lambda g_at, wdt: depthwise_input_grad_te(q, g_at, (side, side), wdt, x_shape)),
                [mask, k, g, wp, wd], channel_at_a_time)
    np.testing.assert_array_equal(fast, plain)


@pytest.mark.parametrize("stride, padding, kernel, side, chunk", [
    (1, (1, 1, 1, 1), 3, 5, None), (2, (0, 0, 1, 1), 3, 4, None), (2, (1, 1, 1, 1), 3, 3, (2, 3)),
    (1, (2, 2, 2, 2), 5, 4, (1, 5)), (2, (2, 1, 2, 2), 5, 3, None)])
def test_depthwise_input_grad_over_a_padded_channel_is_bit_exact(stride, padding, kernel, side, chunk):
    """Strides 1 and 2, TensorFlow's asymmetric SAME padding, 3×3 and 5×5, channel chunks."""
    rng = np.random.default_rng(stride * 100 + kernel + side)
    channels = 7
    q = QConvParams(0.1, 0, (0.01,) * channels, 0.1, 0, strides=(stride, stride), padding=padding,
                    groups=channels)
    h = (side - 1) * stride + kernel - padding[0] - padding[2]
    x_shape = [1, channels, h, h + stride - 1]
    ow = (x_shape[3] + padding[1] + padding[3] - kernel) // stride + 1
    count = chunk[1] if chunk else channels
    g = rng.standard_normal((1, channels, side, ow)).astype(np.float32)
    w = rng.integers(-128, 128, (channels, 1, kernel, kernel)).astype(np.int8)
    plain = _run(lambda gt, wt: qconv_input_grad_te(q, lambda *i: gt[i], [], (side, ow), wt, x_shape, chunk),
                 [g, w])
    fast = _run(lambda gt, wt: depthwise_input_grad_te(q, lambda *i: gt[i], (side, ow), wt, x_shape, chunk),
                [g, w], padded_channels)
    assert fast.shape == (1, count, *x_shape[2:])
    np.testing.assert_array_equal(fast, plain)


def test_packed_mask_kernel_reads_its_bits_back():
    """The packed mask the tests above feed in is the one the forward packs."""
    rng = np.random.default_rng(5)
    y = rng.integers(-128, 128, (1, 3, 3, 5)).astype(np.int8)
    packed = _run(lambda yt: pack_clamp_mask_te(yt, -128, 127), [y])
    np.testing.assert_array_equal(packed, np.packbits((y > -128) & (y < 127), bitorder="little"))


def test_bias_gradient_through_a_projection_sums_only_unclamped_elements():
    """A depthwise layer's bias gradient from the 1×1 projection after it: the clamped
    elements (half of them here) add nothing."""
    rng = np.random.default_rng(11)
    channels, o, side = 7, 5, 3
    shape = (1, channels, side, side)
    mask = _mask(rng, shape)
    k = rng.random(channels).astype(np.float32)
    g = rng.standard_normal((1, o, side, side)).astype(np.float32)
    w = rng.integers(-128, 128, (o, channels, 1, 1)).astype(np.int8)
    def body(mt, kt, gt, wt):
        return channel_sums_te(pointwise_grad_rows_te(mt, kt, gt, wt, 0, channels, shape))

    got = _run(body, [mask, k, g, w], sums_per_channel)
    inside = np.unpackbits(mask, bitorder="little")[:np.prod(shape)].reshape(shape).astype(bool)
    total = np.einsum("nohw,oc->nchw", g.astype(np.float64), w[:, :, 0, 0].astype(np.float64))
    expected = np.where(inside, total * k[None, :, None, None], 0.0).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    unmasked = (total * k[None, :, None, None]).sum(axis=(0, 2, 3))
    assert np.abs(got - unmasked).max() > 1.0


@pytest.mark.parametrize("rows, c0, channels, side, rounding",
                         [(5, 2, 7, 3, "stochastic"), (6, 0, 3, 4, "nearest")])
def test_fused_rows_update_one_input_channel_at_a_time_is_bit_exact(rows, c0, channels, side, rounding):
    """A 1×1 conv's rows updated from their gradient summed in place (FuseWeightUpdate):
    the same int8 weights as the plain loops over ``qconv_weight_grad_te``."""
    from relay_passes.fuse_update import fused_rows_update
    from relay_passes.int8_arith import integer_step
    from relay_passes.int8_grad_kernels import input_channel_outer, qconv_weight_grad_te

    rng = np.random.default_rng(rows + channels)
    q = QConvParams(0.1, 5, (0.01,) * (rows + c0), 0.1, 0)
    x = rng.integers(-128, 128, (1, channels, side, side)).astype(np.int8)
    g = (rng.standard_normal((1, rows, side, side)) * 40).astype(np.float32)
    w = rng.integers(-127, 128, (rows + c0, channels, 1, 1)).astype(np.int8)
    factor = rng.random(rows + c0).astype(np.float32) * 0.05

    def plain(xt, gt, wt, ft):
        grad = qconv_weight_grad_te(q, xt, gt, [rows, channels, 1, 1])
        def body(j, *i):
            full = (j + c0, *i)
            return integer_step(wt[full], ft[j + c0] * grad[(j, *i)], full, wt.shape, -127, 127, rounding)
        return te.compute(grad.shape, body, name="y")

    fast = _run(lambda *t: fused_rows_update(q, *t, c0, -127, 127, rounding), [x, g, w, factor],
                input_channel_outer)
    expected = _run(plain, [x, g, w, factor])
    np.testing.assert_array_equal(fast, expected)
    assert (fast != w[c0:]).mean() > 0.2


def test_the_schedules_find_the_sum_over_output_channels_under_a_channel_loop():
    """The reorder that keeps sums in registers needs the reduction loop, which TIR names ax3
    after a compute_at and leaves out when its extent is 1."""
    from tvm import s_tir

    from relay_passes.int8_grad_kernels import _loops_inside

    for o, expected in ((8, True), (1, False)):
        holders = [te.placeholder(shape, dtype, f"in{i}") for i, (shape, dtype) in
                   enumerate((((1, o, 4, 4), "float32"), ((o, 3, 1, 1), "int8"), ((1, 3, 4, 4), "float32")))]
        out = pointwise_input_grad_te(*holders[:2], (1, 3, 4, 4), 0, holders[2])
        func = te.create_prim_func([*holders, out])
        sch = s_tir.Schedule(func)
        channel = sch.get_loops(sch.get_sblock("y"))[1]
        sch.compute_at(sch.get_sblock("part"), channel)
        spatial, reduction = _loops_inside(sch, sch.get_sblock("part"), channel)
        assert (reduction is not None) == expected and len(spatial) == 2
        if expected:
            assert int(sch.get(reduction).extent) == o

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
          (1, 1, 3, 4, 2), (1, 8, 3, 1, 0),  # a chunk of one output channel, a 1×1 map (VWW, MobileNetV2)
          (1, 24, 3, 3, 1)]  # sums in steps of 8 terms


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
                         [(9, 5, 2, 5, 3), (6, 7, 0, 6, 4), (6, 7, 0, 6, 1), (5, 1, 1, 3, 2),  # unit loops
                          (9, 16, 1, 7, 3)])  # sums in steps of 8 terms
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
                         [(5, 2, 7, 3, "stochastic"), (6, 0, 3, 4, "nearest"), (8, 1, 5, 3, "stochastic"),
                          (8, 3, 5, 1, "stochastic"), (3, 0, 2, 1, "nearest")])  # 1×1 maps: no reduction loop
def test_fused_rows_update_one_input_channel_at_a_time_is_bit_exact(rows, c0, channels, side, rounding):
    """A 1×1 conv's rows updated from their gradient summed in place (FuseWeightUpdate):
    the same int8 weights as the plain loops over ``qconv_weight_grad_te``, output channels
    4 at a time (8 rows), 2 (6), 1 (5, 3)."""
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


@pytest.mark.parametrize("channels, o, step, side", [(6, 5, 2, 3), (5, 3, 5, 2), (4, 7, 1, 1)])
def test_bias_summed_from_read_through_chunks_is_the_whole_kernels_bits(channels, o, step, side):
    """BiasFromThroughRows: a depthwise layer's bias gradient summed chunk by chunk from the
    read-through rows (each chunk its channels' sums) has the bits of the whole kernel."""
    rng = np.random.default_rng(channels * 7 + o)
    shape = (1, channels, side, side)
    mask = _mask(rng, shape)
    k = rng.random(channels).astype(np.float32)
    g = rng.standard_normal((1, o, side, side)).astype(np.float32)
    w = rng.integers(-128, 128, (o, channels, 1, 1)).astype(np.int8)
    whole = _run(lambda *t: channel_sums_te(pointwise_grad_rows_te(*t, 0, channels, shape)), [mask, k, g, w],
                 sums_per_channel)
    parts = []
    for c0 in range(0, channels, step):
        rows = _run(lambda *t, c0=c0: pointwise_grad_rows_te(*t, c0, step, shape), [mask, k, g, w],
                    sums_per_channel)
        parts.append(_run(channel_sums_te, [rows]))
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    inside = np.unpackbits(mask, bitorder="little")[:np.prod(shape)].reshape(shape).astype(bool)
    total = np.einsum("nohw,oc->nchw", g.astype(np.float64), w[:, :, 0, 0].astype(np.float64))
    expected = np.where(inside, total * k[None, :, None, None], 0.0).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-4)


def _bottleneck_gradient():
    """The inverted bottleneck of ``test_int8`` (its middle gradient in four chunks), its
    gradient tuples folded away as the training pipeline does before BiasFromThroughRows."""
    from tvm import relax

    from relay_passes import int8_grads
    from relay_passes.append_loss import AppendLoss
    from relay_passes.gradient import BuildGradient
    from tests import test_int8

    net = test_int8._TinyInt8Net(arch="bottleneck")
    chunk_bytes, int8_grads.CHUNK_BYTES = int8_grads.CHUNK_BYTES, test_int8.SMALL_CHUNKS
    try:
        mod = BuildGradient()(AppendLoss(list(net.params))(net.module()))
    finally:
        int8_grads.CHUNK_BYTES = chunk_bytes
    mod = relax.transform.CanonicalizeBindings()(mod)
    return net, relax.transform.DeadCodeElimination(["train_loss_adjoint"])(mod)


def _kernels_called(mod, func: str) -> list[str]:
    from tvm import relax

    return [b.value.args[0].name_hint for b in mod[func].body.blocks[0].bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.args[0], tvm.ir.GlobalVar)]


def test_bias_from_through_rows_drops_the_second_pass_over_the_projection():
    from relay_passes.int8_grad_kernels import THROUGH_BIAS
    from relay_passes.int8_ops import kernel_tag
    from relay_passes.through_bias import BiasFromThroughRows

    _, mod = _bottleneck_gradient()
    new = BiasFromThroughRows("train_loss_adjoint")(mod)

    def tags(m):
        return [kernel_tag(m, b.value)[0] for b in m["train_loss_adjoint"].body.blocks[0].bindings]

    assert tags(mod).count(THROUGH_BIAS) == 1 and THROUGH_BIAS not in tags(new)
    # the depthwise bias's four chunk sums join the expansion's own four
    before, after = _kernels_called(mod, "train_loss_adjoint"), _kernels_called(new, "train_loss_adjoint")
    assert len(after) == len(before) + 3
    assert sum(k.startswith("qgrad_through_rows") for k in after) == 4


@pytest.mark.slow
def test_bias_from_through_rows_keeps_every_gradient_bit():
    """The whole backward before and after the pass (VM, host): loss and all gradients equal."""
    from relay_passes.through_bias import BiasFromThroughRows
    from tests.test_int8 import _vm

    net, mod = _bottleneck_gradient()
    new = BiasFromThroughRows("train_loss_adjoint")(mod)

    def run(m):
        args = [tvm.runtime.tensor(net.x), tvm.runtime.tensor(np.array([net.label], np.int64))]
        args += [tvm.runtime.tensor(np.asarray(net.params[p.name], str(p.ty.dtype)))
                 for p in m["train_loss_adjoint"].params[2:]]
        loss, grads = _vm(m)["train_loss_adjoint"](*args)
        return float(loss.numpy()), [g.numpy() for g in grads]

    (loss0, grads0), (loss1, grads1) = run(mod), run(new)
    assert loss0 == loss1
    for a, b in zip(grads0, grads1):
        np.testing.assert_array_equal(a, b)

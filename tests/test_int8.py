"""int8 models: forward against the TFLite interpreter, gradients against a float64 twin, QAS.

The forward reference is LiteRT's interpreter with its reference kernels. The
gradient reference is a numpy float64 twin of a small quantized network: the
same integer weights, scales and zero points, computed without rounding, and
differentiated by central differences. Its gradient is what the int8 graph's
straight-through gradient must be wherever no output clamps.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

import tvm_tinytrain as tt
from relay_passes import AppendLoss, BuildGradient, int8_grads, int8_ops
from relay_passes.int8_ops import QAddParams, QConvParams, QPoolParams
from relay_passes.plain_calls import PlainTIRCalls
from relay_passes.qas import QuantizationAwareScaling
from tests.numpy_reference import conv2d_nchw
from tvm_tinytrain.frontend.emitter import RelaxEmitter

MODELS = ["vww_96_int8.tflite", "resnet8_cifar10_int8.tflite"]


def _vm(mod: tvm.IRModule) -> relax.VirtualMachine:
    return relax.VirtualMachine(tvm.compile(PlainTIRCalls(mod), target="llvm"), tvm.cpu())


# ---- forward: the int8 graph against LiteRT's reference kernels ----------------------
@pytest.mark.parametrize("name", MODELS)
def test_int8_forward_matches_litert_reference_kernels(shared_model, name):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    path = shared_model(name)
    mod, params = tt.load_model(path, float_classifier=False)
    vm = _vm(mod)
    weights = [tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]]
    interp = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    assert inp["dtype"] == np.int8 and str(mod["main"].params[0].ty.dtype) == "int8"
    ops = interp._get_ops_details()
    logits = [o for o in ops if o["op_name"] == "FULLY_CONNECTED"][-1]["outputs"][0]
    scale, zero = interp.get_tensor_details()[logits]["quantization"]
    rng = np.random.default_rng(0)
    within, total, top1 = 0, 0, 0
    for _ in range(100):
        x = rng.integers(-128, 128, size=inp["shape"], dtype=np.int8)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        ref = interp.get_tensor(logits).astype(np.int64)
        ours = np.round(vm["main"](tvm.runtime.tensor(x), *weights).numpy() / scale + zero)
        within += int(np.sum(np.abs(ours - ref) <= 1))
        total += ref.size
        top1 += int(np.argmax(ours) == np.argmax(ref))
    assert within / total >= 0.999
    assert top1 == 100


def test_quantize_input_uses_the_model_input_scale(shared_model):
    mod, _ = tt.load_model(shared_model("vww_96_int8.tflite"))
    x = np.array([0.0, 0.25, 1.0, 2.0], np.float32)
    # vww's input: scale 1/255, zero point -128
    assert tt.quantize_input(mod, x).tolist() == [-128, -64, 127, 127]
    float_mod, _ = tt.load_model(shared_model("vww_96_float.tflite"))
    with pytest.raises(tt.InputError, match="float input"):
        tt.quantize_input(float_mod, x)
    resnet, _ = tt.load_model(shared_model("resnet8_cifar10_int8.tflite"))
    with pytest.warns(UserWarning, match=r"expects inputs in \[0, 255\]"):
        tt.quantize_input(resnet, np.linspace(0, 1, 10))  # data in [0, 1] for a 0..255 model



@pytest.mark.parametrize("name", MODELS)
def test_dequantized_twin_is_the_int8_file_without_rounding(shared_model, name):
    """``load_model(dequantize=True)``: every weight is the file's int8 tensor times its
    per-channel scales (as LiteRT reads them), and the float logits stay within a few output
    steps of LiteRT's int8 logits: all that differs is the rounding. Random inputs drive
    activations into the int8 ranges' clamps, which the twin must keep."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    path = shared_model(name)
    mod, params = tt.load_model(path, dequantize=True)
    assert str(mod["main"].params[0].ty.dtype) == "float32"
    interp = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interp.allocate_tensors()
    ops = interp._get_ops_details()
    details = interp.get_tensor_details()
    weight_ops = [o for o in ops if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    layers = tt.layer_table(mod)
    assert len(weight_ops) == len(layers)
    to_oihw = {"CONV_2D": (0, 3, 1, 2), "DEPTHWISE_CONV_2D": (3, 0, 1, 2), "FULLY_CONNECTED": (0, 1)}
    for op, layer in zip(weight_ops, layers):
        q = details[op["inputs"][1]]["quantization_parameters"]
        w = interp.get_tensor(op["inputs"][1]).astype(np.float64)
        along = [-1 if axis == q["quantized_dimension"] else 1 for axis in range(w.ndim)]
        w = (w - q["zero_points"].reshape(along)) * q["scales"].reshape(along)
        np.testing.assert_allclose(params[layer.weight], w.transpose(to_oihw[op["op_name"]]),
                                   rtol=1e-6, err_msg=layer.weight)

    inp = interp.get_input_details()[0]
    scale, zero = inp["quantization"]
    logits = [o for o in ops if o["op_name"] == "FULLY_CONNECTED"][-1]["outputs"][0]
    out_scale, out_zero = details[logits]["quantization"]
    vm = _vm(mod)
    weights = [tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]]
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(20):
        x = rng.integers(-128, 128, size=inp["shape"], dtype=np.int8)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        ref = (interp.get_tensor(logits).astype(np.float64) - out_zero) * out_scale
        real = ((x.astype(np.float64) - zero) * scale).astype(np.float32)
        ours = vm["main"](tvm.runtime.tensor(real), *weights).numpy()
        errors.append(np.abs(ours - ref).max() / out_scale)
    # measured (mean of the largest error per input): vww 1.7, resnet8 14.0 output steps (nine
    # layers of rounding, three residual adds); without the int8 range clips vww is off by 46.8
    assert np.mean(errors) < 20, np.mean(errors)


def test_weight_headroom_requantizes_a_layer_with_room_to_grow(shared_model):
    """``weight_headroom={8: 1}``: layer 8's weights and bias halved (rounded), its scales and QAS
    factors follow, the other layers are the file's, and the network computes nearly the same
    logits; a layer that is not an int8 conv or linear is an error naming the layer."""
    path = shared_model("resnet8_cifar10_int8.tflite")
    mod, params = tt.load_model(path)
    roomy_mod, roomy = tt.load_model(path, weight_headroom={8: 1})
    assert np.array_equal(roomy["conv8.weight"], np.round(params["conv8.weight"] / 2).astype(np.int8))
    assert np.array_equal(roomy["conv8.bias"], np.round(params["conv8.bias"] / 2).astype(np.int32))
    assert np.abs(roomy["conv8.weight"]).max() <= 64
    for name in params:
        if not name.startswith("conv8."):
            assert np.array_equal(roomy[name], params[name]), name
    qas, roomy_qas = (dict(m["main"].attrs["tinytrain.qas"]) for m in (mod, roomy_mod))
    np.testing.assert_allclose([float(v) for v in roomy_qas["conv8.weight"]],
                               [float(v) / 4 for v in qas["conv8.weight"]], rtol=1e-6)
    rng = np.random.default_rng(0)
    xs = rng.integers(-128, 128, size=(10, 32, 32, 3), dtype=np.int8)
    logits = []
    for m, p in ((mod, params), (roomy_mod, roomy)):
        vm, weights = _vm(m), [tvm.runtime.tensor(p[v.name]) for v in m["main"].params[1:]]
        logits.append([vm["main"](tvm.runtime.tensor(x[None]), *weights).numpy() for x in xs])
    spread = np.abs(np.array(logits[0])).mean()
    assert np.abs(np.array(logits[0]) - np.array(logits[1])).mean() < 0.05 * spread
    with pytest.raises(tt.ModelStructureError, match=r"layer\(s\) \[9\]"):
        tt.load_model(path, weight_headroom={9: 1})  # the float32 classifier


# ---- gradients: a small int8 network against its float64 twin ---------------------
class _TinyInt8Net:
    """``residual``: x → conv 3×3 → depthwise 3×3 /2 → 1×1 conv → add (residual) → avg pool
    → linear. ``bottleneck``: x → 1×1 expansion to 8 → depthwise 3×3 → 1×1 projection to 4
    → 4×4 avg pool /4 → linear (the inverted bottleneck whose middle gradient the backward
    makes in channel chunks). ``conv_dw_project``: the same with a 3×3 conv first (the
    depthwise input gradient then reads the projection's gradient through, whole).

    Scales are chosen so no activation reaches its clamp: the twin is then smooth
    at the integer point and its gradient is the straight-through one.
    """

    GEOMETRY = {  # (stride, padding, groups) of conv0, dwconv1, conv2
        "residual": {"conv0": (1, 1, 1), "dwconv1": (2, 1, 4), "conv2": (1, 0, 1)},
        "bottleneck": {"conv0": (1, 0, 1), "dwconv1": (1, 1, 8), "conv2": (1, 0, 1)},
        "conv_dw_project": {"conv0": (1, 1, 1), "dwconv1": (1, 1, 8), "conv2": (1, 0, 1)},
    }

    def __init__(self, seed: int = 0, arch: str = "residual"):
        rng = np.random.default_rng(seed)
        self.arch, self.geometry = arch, self.GEOMETRY[arch]
        self.x = rng.integers(-40, 40, size=(1, 3, 8, 8)).astype(np.int8)
        self.zx, self.sx = 3, 0.05
        self.label = 1
        mid, k0 = {"residual": (4, 3), "bottleneck": (8, 1), "conv_dw_project": (8, 3)}[arch]
        self.params = {
            "conv0.weight": rng.integers(-30, 30, (mid, 3, k0, k0)),
            "conv0.bias": rng.integers(-200, 200, mid),
            "dwconv1.weight": rng.integers(-30, 30, (mid, 1, 3, 3)),
            "dwconv1.bias": rng.integers(-200, 200, mid),
            "conv2.weight": rng.integers(-30, 30, (4, mid, 1, 1)), "conv2.bias": rng.integers(-200, 200, 4),
            "linear3.weight": rng.integers(-30, 30, (3, 4 if arch == "residual" else 16)),
            "linear3.bias": rng.integers(-200, 200, 3),
        }
        self.sw = {name: tuple(float(s) for s in rng.uniform(0.005, 0.02, len(self.params[name + ".bias"])))
                   for name in ["conv0", "dwconv1", "conv2", "linear3"]}
        self._choose_scales()

    def _twin(self, params, stop: str | None = None):
        """The real function of the integer values (no rounding), float64; with ``stop``,
        the accumulator of that layer (later layers need no scales yet)."""
        p = {k: np.asarray(v, np.float64) for k, v in params.items()}
        q, qa = self.q, getattr(self, "qadd", None)

        def conv(name, x, stride, pad, groups):
            acc = conv2d_nchw(x, p[name + ".weight"], stride, pad, groups) \
                + p[name + ".bias"][None, :, None, None]
            return acc, acc * q[name].real_multiplier[None, :, None, None] if name in q else None

        acc, y0 = conv("conv0", self.x.astype(np.float64) - self.zx, *self.geometry["conv0"])
        if stop == "conv0":
            return acc
        acc, y1 = conv("dwconv1", y0, *self.geometry["dwconv1"])  # y − zy: the next layer's input
        if stop == "dwconv1":
            return acc
        acc, y2 = conv("conv2", y1, *self.geometry["conv2"])
        if stop == "conv2":
            return acc
        s = y2 if qa is None else y1 * (qa.sa / qa.sy) + y2 * (qa.sb / qa.sy)  # the add's (y − zy)
        if self.arch == "residual":
            pooled = s.mean(axis=(2, 3))
        else:  # 4×4 windows, stride 4: (1, 4, 2, 2), flattened
            pooled = s.reshape(1, 4, 2, 4, 2, 4).mean(axis=(3, 5)).reshape(1, 16)
        acc = pooled @ p["linear3.weight"].T + p["linear3.bias"]
        if stop == "linear3":
            return acc
        return acc * q["linear3"].real_multiplier * self.slogits

    def _choose_scales(self):
        """Output scales that keep every activation well inside int8 (|y − zy| ≤ 60)."""
        self.q, zy = {}, {"conv0": -5, "dwconv1": 4, "conv2": -2, "linear3": 6}
        sx, zx = self.sx, self.zx
        geometry = {**self.geometry, "linear3": None}
        for name, geo in geometry.items():
            if name == "linear3" and self.arch == "residual":
                s1, s2 = self.q["dwconv1"].sy, self.q["conv2"].sy
                self.qadd = QAddParams(s1, zy["dwconv1"], s2, zy["conv2"], (s1 + s2) * 1.1, 1)
                sx, zx = self.qadd.sy, 1
            acc = self._twin(self.params, stop=name)  # (1, O, H, W) or (1, O)
            sw = np.asarray(self.sw[name]).reshape(-1, *[1] * (acc.ndim - 2))
            peak = np.abs(acc * sw).max() * sx
            kw = {} if geo is None else dict(strides=(geo[0],) * 2, padding=(geo[1],) * 4, groups=geo[2])
            self.q[name] = QConvParams(sx, zx, self.sw[name], peak / 60, zy[name], **kw)
            sx, zx = self.q[name].sy, zy[name]
        self.slogits, self.zlogits = self.q["linear3"].sy, zy["linear3"]

    def loss(self, params) -> float:
        logits = self._twin(params)
        logits = logits - logits.max()
        return float(-(logits[0, self.label] - np.log(np.exp(logits).sum())))

    def module(self) -> tvm.IRModule:
        em = RelaxEmitter("x", (1, 3, 8, 8), "int8", "NCHW", "float32", "test")
        p = self.params
        y0 = em.qconv2d(em.entry, p["conv0.weight"], p["conv0.bias"], self.q["conv0"], "conv0")
        y1 = em.qconv2d(y0, p["dwconv1.weight"], p["dwconv1.bias"], self.q["dwconv1"], "dwconv1")
        y2 = em.qconv2d(y1, p["conv2.weight"], p["conv2.bias"], self.q["conv2"], "conv2")
        s = em.qadd(y1, y2, self.qadd) if self.arch == "residual" else y2
        if self.arch == "residual":  # a global pool
            pooled = em.reshape(em.qavg_pool(s, QPoolParams((4, 4), (1, 1), (0, 0, 0, 0))), (1, 4))
        else:  # not global: the projection's input gradient is a tensor the depthwise reads through
            pooled = em.reshape(em.qavg_pool(s, QPoolParams((4, 4), (4, 4), (0, 0, 0, 0))), (1, 16))
        y3 = em.qlinear(pooled, p["linear3.weight"], p["linear3.bias"], self.q["linear3"], "linear3")
        mod, _ = em.finish(em.dequantize(y3, self.slogits, self.zlogits))
        return mod


# the bottleneck's middle gradient (8 channels × 8 × 8 floats) in four chunks of two channels
SMALL_CHUNKS = 2 * 8 * 8 * 4


def _gradients(arch: str):
    net = _TinyInt8Net(arch=arch)
    chunk_bytes, int8_grads.CHUNK_BYTES = int8_grads.CHUNK_BYTES, SMALL_CHUNKS
    try:
        mod = BuildGradient()(AppendLoss(list(net.params))(net.module()))
    finally:
        int8_grads.CHUNK_BYTES = chunk_bytes
    vm = _vm(mod)
    args = [tvm.runtime.tensor(net.x), tvm.runtime.tensor(np.array([net.label], np.int64))]
    args += [tvm.runtime.tensor(np.asarray(net.params[p.name], str(p.ty.dtype)))
             for p in mod["train_loss_adjoint"].params[2:]]
    loss, grads = vm["train_loss_adjoint"](*args)
    return net, mod, float(loss.numpy()), {n: g.numpy() for n, g in zip(net.params, grads)}


@pytest.fixture(scope="module")
def tiny():
    return _gradients("residual")


@pytest.fixture(scope="module")
def bottleneck():
    return _gradients("bottleneck")


@pytest.fixture(scope="module")
def conv_dw_project():
    return _gradients("conv_dw_project")


def test_bottleneck_backward_makes_its_middle_gradient_in_chunks(bottleneck):
    _, mod, _, _ = bottleneck
    kernels = [gv.name_hint for gv in mod.get_global_vars()]
    assert len([k for k in kernels if k.startswith("qconv_input_grad_chunk")]) >= 1
    calls = mod["train_loss_adjoint"].script().count("qconv_input_grad_chunk")
    assert calls == 4  # one per chunk of two channels


def test_int8_network_loss_is_its_twin_up_to_rounding(tiny):
    net, _, loss, _ = tiny
    assert abs(loss - net.loss(net.params)) < 0.05


# linear3.weight reads the pooled features, a few integer steps wide: rounding them moves
# its gradient by ~30 %; the single-layer test below checks that weight gradient exactly
@pytest.mark.parametrize("arch", ["tiny", "bottleneck", "conv_dw_project"])
@pytest.mark.parametrize("name", ["conv0.weight", "conv0.bias", "dwconv1.weight", "dwconv1.bias",
                                  "conv2.weight", "conv2.bias", "linear3.bias"])
def test_int8_gradient_matches_float64_twin_by_finite_differences(request, arch, name):
    """Through every quantized op's input gradient: add, avg pool, 1×1, depthwise, conv; and
    through an inverted bottleneck's chunked backward."""
    net, _, _, grads = request.getfixturevalue(arch)
    params = {k: np.asarray(v, np.float64) for k, v in net.params.items()}
    rng = np.random.default_rng(1)
    eps = 1e-3
    scale = np.abs(grads[name]).max()
    assert scale > 0
    for _ in range(8):
        idx = tuple(int(rng.integers(0, s)) for s in params[name].shape)
        plus = {**params, name: params[name].copy()}
        plus[name][idx] += eps
        minus = {**params, name: params[name].copy()}
        minus[name][idx] -= eps
        numeric = (net.loss(plus) - net.loss(minus)) / (2 * eps)
        # the int8 forward rounds every activation, the twin none: the saved activations a
        # weight gradient reads differ by up to half a step (a few % of the gradient here)
        assert abs(numeric - grads[name][idx]) <= 0.05 * (scale + abs(numeric)), (idx, numeric)


@pytest.mark.parametrize("kind", ["conv", "depthwise", "linear"])
def test_quantized_layer_gradient_matches_its_float64_twin(kind):
    """One layer on the input, its dequantized output under an MSE loss whose target is far
    away: the only rounding (the layer's output) moves the gradient by < 0.1 %."""
    rng = np.random.default_rng(2)
    if kind == "linear":
        x = rng.integers(-60, 60, (1, 12)).astype(np.int8)
        w = rng.integers(-50, 50, (5, 12)).astype(np.int8)
        geometry = {}
    else:
        x = rng.integers(-60, 60, (1, 4, 6, 6)).astype(np.int8)
        groups = 4 if kind == "depthwise" else 1
        w = rng.integers(-50, 50, (4, 4 // groups, 3, 3)).astype(np.int8)
        geometry = dict(strides=(2, 2), padding=(1, 1, 0, 0), groups=groups)
    b = rng.integers(-300, 300, w.shape[0]).astype(np.int32)
    sw = tuple(float(v) for v in rng.uniform(0.01, 0.03, w.shape[0]))
    zx, sx = 7, 0.04

    def accumulator(wf, bf):
        xs = x.astype(np.float64) - zx
        if kind == "linear":
            return xs @ wf.T + bf
        padded = np.pad(xs, ((0, 0), (0, 0), (1, 0), (1, 0)))  # (top 1, left 1, bottom 0, right 0)
        return conv2d_nchw(padded, wf, 2, 0, geometry["groups"]) + bf[None, :, None, None]

    peak = np.abs(accumulator(w.astype(np.float64), b.astype(np.float64))).max() * max(sw) * sx
    q = QConvParams(sx, zx, sw, peak / 80, -3, **geometry)
    em = RelaxEmitter("x", x.shape, "int8", "NCHW", "float32", "test")
    layer = em.qlinear if kind == "linear" else em.qconv2d
    y = em.dequantize(layer(em.entry, w, b, q, "layer"), q.sy, q.zy)
    if kind != "linear":
        y = em.reshape(y, (1, -1))
    mod, params = em.finish(y)
    names = list(params)
    mod = BuildGradient()(AppendLoss(names, "mse")(mod))
    channel = (slice(None),) if kind == "linear" else (slice(None), None, None)

    def twin(wf, bf):
        scale = (np.asarray(sw) * sx)[channel]
        return (accumulator(wf, bf) * scale).reshape(1, -1)

    target = twin(w.astype(np.float64), b.astype(np.float64)) - 40.0
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(target.astype(np.float32)),
            *[tvm.runtime.tensor(params[n]) for n in names]]
    _, grads = _vm(mod)["train_loss_adjoint"](*args)
    grads = dict(zip(["layer.weight", "layer.bias"], (g.numpy() for g in grads)))  # names[0], names[1]

    def loss(wf, bf):
        return float(np.mean((twin(wf, bf) - target) ** 2))

    eps = 1e-3
    for name, value in (("layer.weight", w), ("layer.bias", b)):
        base = {"layer.weight": w.astype(np.float64), "layer.bias": b.astype(np.float64)}
        numeric = np.zeros(value.shape)
        for idx in np.ndindex(value.shape):
            plus, minus = {k: v.copy() for k, v in base.items()}, {k: v.copy() for k, v in base.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            numeric[idx] = (loss(plus["layer.weight"], plus["layer.bias"])
                            - loss(minus["layer.weight"], minus["layer.bias"])) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=2e-3, atol=2e-3 * np.abs(numeric).max())


@pytest.mark.parametrize("pool", ["avg_pool", "requantized"])
def test_pool_passes_the_gradient_of_a_mean_that_rounded_to_its_lowest_value(pool):
    """ReLU conv → global average pool (TFLite's, or ONNX's requantizing one, a depthwise
    conv of constant ones): a channel with one positive output in sixteen pools to a real
    fraction of a step, stored as −128 (real 0), which no clamp made (the mean of ReLU
    outputs is never negative). Its positive output still moves the loss, as in the float64
    twin, so its bias and weight get that gradient; the clamped outputs none."""
    x = np.full((1, 1, 4, 4), -10, np.int8)
    x[0, 0, 1, 2] = 5
    w, b = np.array([1, 4], np.int8).reshape(2, 1, 1, 1), np.zeros(2, np.int32)
    sx, sw, sy = 0.1, (0.1, 0.1), 0.01  # requant multiplier 1: y = clamp(acc − 128)
    q = QConvParams(sx, 0, sw, sy, -128, lo=-128, hi=127)
    em = RelaxEmitter("x", x.shape, "int8", "NCHW", "float32", "test")
    y = em.qconv2d(em.entry, w, b, q, "conv0")
    if pool == "avg_pool":
        s_pool, pooled = sy, em.qavg_pool(y, QPoolParams((4, 4), (1, 1), (0, 0, 0, 0)))
    else:  # the mean at twice the step, as the ONNX QDQ frontend writes it
        s_pool = 2 * sy
        mean = QConvParams(sy, -128, (1 / 16, 1 / 16), s_pool, -128, groups=2)
        pooled = int8_ops.emit_qconv(em.bb, y, relax.const(np.ones((2, 1, 4, 4), np.int8)),
                                     relax.const(np.zeros(2, np.int32)), mean)
    forward, params = em.finish(em.reshape(em.dequantize(pooled, s_pool, -128), (1, 2)))
    mod = BuildGradient()(AppendLoss(["conv0.weight", "conv0.bias"], "mse")(forward))
    target = np.array([[1.0, 1.0]], np.float32)

    def loss(wf, bf):
        acc = x.astype(np.float64).reshape(1, 16) * wf.reshape(2, 1) + bf.reshape(2, 1)
        real = np.maximum(acc, 0).mean(axis=1) * sy  # M = 1: acc steps are output steps
        return float(np.mean((real - target[0]) ** 2))

    tensors = [tvm.runtime.tensor(params[n]) for n in ("conv0.weight", "conv0.bias")]
    out = _vm(forward)["main"](tvm.runtime.tensor(x), *tensors).numpy()[0]
    assert (np.round(out / s_pool) - 128).tolist() == [-128, -127]  # channel 0's mean rounds to 0
    _, grads = _vm(mod)["train_loss_adjoint"](tvm.runtime.tensor(x), tvm.runtime.tensor(target), *tensors)
    gw, gb = (g.numpy() for g in grads)
    eps = 1e-4
    wf, bf = w.astype(np.float64).reshape(2), b.astype(np.float64)
    numeric_b = [(loss(wf, bf + eps * e) - loss(wf, bf - eps * e)) / (2 * eps) for e in np.eye(2)]
    numeric_w = [(loss(wf + eps * e, bf) - loss(wf - eps * e, bf)) / (2 * eps) for e in np.eye(2)]
    assert gb[0] != 0 and gw[0, 0, 0, 0] != 0  # channel 0 pools to −128 and still learns
    np.testing.assert_allclose(gb, numeric_b, rtol=0.02)
    np.testing.assert_allclose(gw.reshape(2), numeric_w, rtol=0.02)


def test_qas_scales_per_output_channel_as_reference_md_states():
    """Hand-made scales: weight gradient × s_W⁻², bias gradient × s_W⁻²·s_x⁻², per channel."""
    em = RelaxEmitter("x", (1, 2, 4, 4), "int8", "NCHW", "float32", "test")
    q = QConvParams(sx=0.1, zx=0, sw=(0.5, 0.25), sy=0.2, zy=0)
    y = em.qconv2d(em.entry, np.ones((2, 2, 1, 1), np.int8), np.zeros(2, np.int32), q, "conv0")
    pooled = em.reshape(em.qavg_pool(y, QPoolParams((4, 4), (1, 1), (0, 0, 0, 0))), (1, 2))
    mod, params = em.finish(em.dequantize(pooled, 0.2, 0))
    assert list(mod["main"].attrs["tinytrain.qas"]["conv0.weight"]) == [4.0, 16.0]
    assert np.allclose(list(mod["main"].attrs["tinytrain.qas"]["conv0.bias"]), [400.0, 1600.0])
    base = BuildGradient()(AppendLoss(["conv0.weight", "conv0.bias"])(mod))
    scaled = QuantizationAwareScaling()(base)
    x = tvm.runtime.tensor(np.arange(32, dtype=np.int8).reshape(1, 2, 4, 4))
    args = [x, tvm.runtime.tensor(np.array([1], np.int64)),
            *[tvm.runtime.tensor(params[n]) for n in ("conv0.weight", "conv0.bias")]]
    _, (gw, gb) = _vm(base)["train_loss_adjoint"](*args)
    _, (sw, sb) = _vm(scaled)["train_loss_adjoint"](*args)
    assert np.abs(gw.numpy()).max() > 0
    np.testing.assert_allclose(sw.numpy(), gw.numpy() * np.array([4.0, 16.0])[:, None, None, None],
                               rtol=1e-6)
    np.testing.assert_allclose(sb.numpy(), gb.numpy() * np.array([400.0, 1600.0]), rtol=1e-6)


# ---- training: integer updates, QAS vs no QAS ----------------------------------------
def test_int8_update_keeps_integer_weights_and_biases(shared_model):
    mod, params = tt.load_model(shared_model("resnet8_cifar10_int8.tflite"))
    scheme = {"bias": {"last": 3}, "weights": {"7": 0.5, "8": 1}, "classifier": True}
    train = tt.relay.transform.TinyTrain(scheme, optimizer=tt.SGD(lr=0.01))(mod)
    trainer = tt.build(train, params)
    x = np.random.default_rng(0).integers(-128, 128, (1, 32, 32, 3)).astype(np.int8)
    trainer.step(x, 3)
    after = trainer.params()
    assert after["conv7.weight"].dtype == np.int8 and after["conv8.bias"].dtype == np.int32
    assert after["linear9.weight"].dtype == np.float32  # the float classifier
    assert np.array_equal(after["conv7.weight"][32:], params["conv7.weight"][32:])  # 1/2 of 64 learn
    assert not np.array_equal(after["conv7.weight"][:32], params["conv7.weight"][:32])
    assert not np.array_equal(after["conv8.weight"], params["conv8.weight"])
    assert np.abs(after["conv8.weight"].astype(int)).max() <= 127
    assert np.array_equal(after["conv0.weight"], params["conv0.weight"])


def _digits(shape, count=600):
    from sklearn.datasets import load_digits

    digits = load_digits()
    h, w, _ = shape
    rows = (np.arange(h) * 8 // h)[:, None]
    cols = (np.arange(w) * 8 // w)[None, :]
    images = digits.images[:count, rows, cols] / 16.0  # nearest-neighbour upsampling
    return np.repeat(images[..., None], 3, axis=-1).astype(np.float32), digits.target[:count]


def test_qas_fine_tunes_int8_better_than_without(shared_model):
    """Same steps, learning rate and seed; the all-int8 model (int8 classifier too), its int8
    classifier learning (stochastic rounding, the default)."""
    mod, params = tt.load_model(shared_model("resnet8_cifar10_int8.tflite"), float_classifier=False)
    xs, ys = _digits((32, 32, 3))
    xs = tt.quantize_input(mod, xs * 255)  # ResNet-8 takes pixels in 0..255 (scale 1, zero -128)
    train_x, train_y, test_x, test_y = xs[:400], ys[:400], xs[400:], ys[400:]
    accuracy = {}
    for qas in (True, False):
        step = tt.relay.transform.TinyTrain("last-layer", optimizer=tt.SGD(lr=0.01, momentum=0.9),
                                            qas=qas)(mod)
        trainer = tt.build(step, params)
        trainer.fit(train_x, train_y, epochs=1, seed=0)
        accuracy[qas] = trainer.evaluate(test_x, test_y)
    assert accuracy[True] > accuracy[False] + 0.1, accuracy


@pytest.mark.parametrize("arch, built_lr", [("tiny", 0.5), ("bottleneck", 0.5), ("tiny", 3.0)])
def test_fused_weight_update_equals_gradient_then_update(request, monkeypatch, arch, built_lr):
    """SGD on int8 weights sums each weight's gradient straight into its update
    (FuseWeightUpdate), by row chunks for a bottleneck's expansion: the result is the
    rounded step of the tested gradient. The learning rate is a runtime scalar: built with
    another one and set before the step, the step is the same."""
    net, mod, _, grads = request.getfixturevalue(arch)
    lr = 0.5
    monkeypatch.setattr(int8_grads, "CHUNK_BYTES", SMALL_CHUNKS)
    step = tt.relay.transform.TinyTrain("full", optimizer=tt.SGD(lr=built_lr), integer_rounding="nearest")(
        net.module())
    kernels = {gv.name_hint for gv in step.get_global_vars()}
    assert any(name.startswith("qconv_weight_update") for name in kernels)
    assert any(name.startswith("qconv_weight_rows_update") for name in kernels) == (arch == "bottleneck")
    assert not any(name.startswith("qconv_weight_grad") for name in kernels)  # fused away
    trainer = tt.build(step, {k: np.asarray(v) for k, v in net.params.items()})
    assert trainer.learning_rate == built_lr
    trainer.learning_rate = lr
    trainer.step(net.x, net.label)
    after = trainer.params()
    qas = {k: np.asarray(list(v)) for k, v in mod["predict"].attrs["tinytrain.qas"].items()}
    for name in ("conv0.weight", "dwconv1.weight", "conv2.weight", "linear3.weight"):
        factor = qas[name].reshape(-1, *[1] * (grads[name].ndim - 1))
        expected = np.clip(np.round(net.params[name] - lr * factor * grads[name]), -127, 127)
        differ = after[name].astype(int) != expected.astype(int)
        assert after[name].dtype == np.int8
        assert differ.mean() <= 0.02, name  # a tie rounded the other way by summation order
        assert np.abs(after[name].astype(int) - expected).max() <= 1, name
        assert not np.array_equal(after[name], net.params[name]), name


def test_stochastic_rounding_moves_weights_by_the_float_step_on_average(tiny):
    """Steps below half a unit: nearest rounding loses them all; stochastic rounding moves
    each weight by the float step in expectation."""
    net, mod, _, grads = tiny
    name = "conv0.weight"
    factor = np.asarray(list(mod["predict"].attrs["tinytrain.qas"][name])).reshape(-1, 1, 1, 1)
    lr = 0.45 / np.abs(factor * grads[name]).max()  # the largest step: 0.45 of a unit
    expected = -lr * factor * grads[name]
    moved = {}
    for rounding in ("nearest", "stochastic"):
        sgd = tt.SGD(lr=float(lr))
        step = tt.relay.transform.TinyTrain("full", optimizer=sgd, integer_rounding=rounding)(net.module())
        trainer = tt.build(step, {k: np.asarray(v) for k, v in net.params.items()})
        trainer.step(net.x, net.label)
        moved[rounding] = trainer.params()[name].astype(float) - net.params[name]
    assert not moved["nearest"].any()
    assert set(np.unique(moved["stochastic"])) <= {-1.0, 0.0, 1.0}
    assert np.abs(moved["stochastic"]).sum() >= 5
    # a sum of independent Bernoulli moves: within 4 standard deviations of the float sum
    assert abs(moved["stochastic"].sum() - expected.sum()) <= 4 * np.sqrt(expected.size) * 0.5
    assert np.all(moved["stochastic"] * expected >= 0)  # never against the gradient


def test_frozen_int8_chain_in_row_bands_computes_the_same_bits():
    """BandFrozenChains: the frozen conv → depthwise → 1×1 chain run a few output rows at a
    time gives the same logits, loss and update as the chain run whole."""
    net = _TinyInt8Net(arch="bottleneck")
    params = {k: np.asarray(v) for k, v in net.params.items()}
    results = {}
    for chunk_bytes in (None, 256):
        step = tt.relay.transform.TinyTrain("last-layer", optimizer=tt.SGD(lr=0.5), chunk_bytes=chunk_bytes,
                                            integer_rounding="nearest")(net.module())
        kernels = [gv.name_hint for gv in step.get_global_vars()]
        assert any(k.startswith("write_rows") for k in kernels) == (chunk_bytes is not None)
        trainer = tt.build(step, params)
        logits = trainer.predict(net.x)
        loss = trainer.step(net.x, net.label)
        results[chunk_bytes] = (logits, loss, trainer.params()["linear3.weight"])
    (l0, s0, w0), (l1, s1, w1) = results[None], results[256]
    np.testing.assert_array_equal(l0, l1)
    assert s0 == s1
    np.testing.assert_array_equal(w0, w1)


def test_packed_clamp_mask_is_one_bit_per_element_little_endian():
    from relay_passes.int8_grad_kernels import pack_clamp_mask_te

    y = np.random.default_rng(3).integers(-128, 128, (1, 3, 5, 7)).astype(np.int8)
    y.flat[:4] = [-128, 127, 0, -127]
    yt = tvm.te.placeholder(y.shape, "int8", "y")
    func = tvm.te.create_prim_func([yt, pack_clamp_mask_te(yt, -128, 127)])
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((y.size + 7) // 8, np.uint8))
    lib["main"](tvm.runtime.tensor(y), out)
    expected = np.packbits((y > -128) & (y < 127), bitorder="little")
    np.testing.assert_array_equal(out.numpy(), expected)


def test_depthwise_reads_the_projection_gradient_through(conv_dw_project):
    """Between a 3×3 conv and a 1×1 projection, the depthwise input gradient reads the
    projection's narrow gradient (its wide output gradient is never a tensor)."""
    _, mod, _, _ = conv_dw_project
    through = [gv for gv, f in mod.functions.items()
               if f.attrs is not None and "tinytrain.dw_through" in f.attrs]
    assert through
    assert through[0].name_hint in mod["train_loss_adjoint"].script()

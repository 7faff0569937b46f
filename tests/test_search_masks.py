"""One build for every candidate scheme (issue 18): a scheme as an update mask on the ``full`` step
gives the same updated parameters as the scheme's own build.

Float ONNX (zoo.small_cnn) and int8 TFLite (the demo's CNN quantized by ``ptq``, with a depthwise
layer), SGD with momentum, QAS on: 10 samples through both builds, then ``params()`` compared.
Also: a mask change never touches what the previous mask trained (momentum included), masks
and ``mask_for`` refuse what does not fit in one line, and an exported library round-trips.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import tvm
from conftest import small_cnn
from tvm import te

import tvm_tinytrain as tt
from relay_passes.int8_arith import integer_step
from tvm_tinytrain.errors import InputError, SchemeError, TinyTrainError
from tvm_tinytrain.layers import layer_table
from tvm_tinytrain.relay.transform import TinyTrain
from tvm_tinytrain.scheme import resolve
from tvm_tinytrain.search.masks import mask_for, union_scheme
from tvm_tinytrain.trainer import HostTrainer

SGD = tt.SGD(lr=0.05, momentum=0.9)
# small_cnn and the demo's CNN: conv0 (8) → conv1 (16, stride 2) → dwconv2 (16) → conv3 1×1 (16) → linear4
CLASSIFIER = {"classifier": True}
BIAS_LAST_2 = {"bias": {"last": 2}, "classifier": True}
CONV_QUARTER = {"bias": {"last": 5}, "weights": {"1": 0.25}, "classifier": True}  # a partial split
DEPTHWISE_HALF = {"bias": {"last": 5}, "weights": {"2": 0.5}, "classifier": True}
SCHEMES = {"classifier": CLASSIFIER, "bias-last-2": BIAS_LAST_2, "conv1-quarter": CONV_QUARTER,
           "dwconv2-half": DEPTHWISE_HALF}


class Model:
    """A model with its layers, 10 samples, and the ``full`` step every scheme is masked on."""

    def __init__(self, path, xs):
        self.mod, self.params = tt.load_model(path)
        self.layers = layer_table(self.mod)
        self.xs, self.ys = xs, np.random.default_rng(1).integers(0, 10, len(xs))
        self.union = HostTrainer(TinyTrain("full", optimizer=SGD)(self.mod), self.params)

    def build(self, scheme) -> HostTrainer:
        return HostTrainer(TinyTrain(scheme, optimizer=SGD)(self.mod), self.params)

    def masked(self, scheme) -> HostTrainer:
        self.union.reset()
        self.union.mask = mask_for(scheme, self.layers, resolve("full", self.layers))
        return self.union

    def train(self, trainer) -> list[float]:
        return [trainer.step(x, y) for x, y in zip(self.xs, self.ys)]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("masks") / "small_cnn.onnx"
    onnx.save(small_cnn(), path)
    return Model(path, np.random.default_rng(0).normal(size=(10, 1, 1, 8, 8)).astype(np.float32))


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory):
    from tvm_tinytrain.demo import float_cnn
    from tvm_tinytrain.ptq import quantize_tflite

    folder = tmp_path_factory.mktemp("masks_int8")
    onnx.save(float_cnn(0, 8), folder / "cnn.onnx")
    mod, params = tt.load_model(folder / "cnn.onnx")
    calibration = np.random.default_rng(2).normal(size=(50, 1, 8, 8))
    path = quantize_tflite(mod, calibration, folder / "cnn_int8.tflite", params=params)
    return Model(path, np.random.default_rng(0).integers(-128, 128, (10, 1, 8, 8, 1), dtype=np.int8))


def trained_channels(model: Model, scheme) -> dict[str, slice]:
    """Parameter → the rows the scheme trains (its own resolve, not the mask)."""
    return {name: slice(None, k) for name, k in resolve(scheme, model.layers).items()}


def check_untrained_unchanged(model: Model, scheme, params: dict[str, np.ndarray]) -> None:
    """What the scheme does not train is bit-equal to the model's values; what it trains moved."""
    rows = trained_channels(model, scheme)
    for name, initial in model.params.items():
        frozen = initial if name not in rows else initial[rows[name].stop or len(initial):]
        now = params[name] if name not in rows else params[name][rows[name].stop or len(initial):]
        assert np.array_equal(now, frozen), f"{name}: an entry the scheme does not train changed"
    for name, part in rows.items():
        assert not np.array_equal(params[name][part], model.params[name][part]), f"{name} did not learn"


# ---- float: the masked union equals each scheme's build ---------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_float_masked_union_equals_the_schemes_own_build(float_model, scheme):
    own = float_model.build(scheme)
    own_losses = float_model.train(own)
    masked = float_model.masked(scheme)
    masked_losses = float_model.train(masked)
    np.testing.assert_allclose(masked_losses, own_losses, rtol=1e-5, atol=1e-6)
    for name, value in own.params().items():  # a split conv adds in another order: float32 rounding
        np.testing.assert_allclose(masked.params()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    check_untrained_unchanged(float_model, scheme, masked.params())


# ---- int8: exact --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scheme", [CLASSIFIER, BIAS_LAST_2, DEPTHWISE_HALF],
                         ids=["classifier", "bias-last-2", "dwconv2-half"])
def test_int8_masked_union_equals_the_schemes_own_build_exactly(int8_model, scheme):
    """Every step computes the same gradients bit for bit, so stochastic rounding (a hash of the
    element's index and of its step's bits) rounds alike: int8 weights and int32 biases equal
    exactly after 10 steps. A depthwise split is exact too: each channel's input gradient comes
    from its own channel, whichever build."""
    own = int8_model.build(scheme)
    own_losses = int8_model.train(own)
    masked = int8_model.masked(scheme)
    assert int8_model.train(masked) == own_losses
    for name, value in own.params().items():
        assert masked.params()[name].dtype == value.dtype
        if value.dtype.kind == "f":  # the float classifier
            np.testing.assert_allclose(masked.params()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(masked.params()[name], value, err_msg=name)
    check_untrained_unchanged(int8_model, scheme, masked.params())


def copy_state(dst: HostTrainer, src: HostTrainer) -> None:
    """``dst``'s parameters and optimizer state ← ``src``'s; a split name (``w[:k]``, ``w[k:]``,
    ``w[:k].momentum``) reads those rows of ``src``'s whole tensor."""
    for name in list(dst._values):  # noqa: SLF001 (a test: two builds put in one state)
        split = re.fullmatch(r"(.*)\[(\d*):(\d*)\](\.\w+)?", name)
        if split is None:
            value = src._values[name].numpy()
        else:
            base, lo, hi, state = split.groups()
            value = src._values[base + (state or "")].numpy()[int(lo or 0):int(hi) if hi else None]
        dst._values[name] = tvm.runtime.tensor(value, dst.device)


@pytest.mark.slow
def test_int8_partial_conv_weight_matches_its_build_step_by_step(int8_model):
    """A standard conv split at k channels (conv1 at 1/4): its input gradient is the sum of two
    kernels' (k and C−k output channels) where the union sums one kernel over C, so the float
    gradients of the layers below it differ in the last bits. Stochastic rounding hashes those
    bits, so an int32 bias below the split can round the other way: 1 LSB. The steps then go
    their own ways (one LSB flips an int8 activation), so 10-step trajectories are not compared;
    each step is, from the same state: the split weight, every parameter at or above its layer
    and the float classifier equal; the biases below it within 1 LSB."""
    own = int8_model.build(CONV_QUARTER)
    masked = int8_model.masked(CONV_QUARTER)
    below = {"conv0.bias"}
    for x, y in zip(int8_model.xs, int8_model.ys):
        copy_state(own, masked)
        assert masked.step(x, y) == own.step(x, y)
        for name, value in own.params().items():
            got = masked.params()[name]
            if value.dtype.kind == "f":
                np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=name)
            elif name in below:
                assert np.abs(got.astype(np.int64) - value).max() <= 1, name
            else:
                np.testing.assert_array_equal(got, value, err_msg=name)
    check_untrained_unchanged(int8_model, CONV_QUARTER, masked.params())


def _hash_rounding(w: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``int8_arith.integer_step``'s stochastic rounding in numpy (uint32 arithmetic wraps here)."""
    index = np.arange(w.size, dtype=np.uint32).reshape(w.shape)
    with np.errstate(over="ignore"):
        h = delta.view(np.uint32) ^ (index * np.uint32(0x9E3779B9))
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    u = (h >> np.uint32(8)).astype(np.float32) * np.float32(1 / (1 << 24))
    return np.clip(np.floor((w.astype(np.float32) - delta) + u), -127, 127).astype(w.dtype)


@pytest.mark.parametrize("shape", [(4, 16, 1, 1), (2, 16, 1, 1), (4, 16, 3, 3)])
def test_stochastic_rounding_kernel_equals_its_formula(shape):
    """The hash's multiplies wrap mod 2^32 on TVM's LLVM build as in C, whatever the shape (they once
    did not: LLVM took a uint32 multiply as never wrapping, and a (4, 16, 1, 1) slice rounded unlike
    rows [:4] of its (16, 16, 1, 1) weight)."""
    w_in, d_in = te.placeholder(shape, "int8", name="w"), te.placeholder(shape, "float32", name="d")
    out = te.compute(shape, lambda *i: integer_step(w_in[i], d_in[i], i, shape, -127.0, 127.0, "stochastic"))
    kernel = tvm.compile(te.create_prim_func([w_in, d_in, out]), target="llvm")
    rng = np.random.default_rng(0)
    w, delta = rng.integers(-100, 100, shape).astype(np.int8), rng.normal(0, 0.5, shape).astype(np.float32)
    got = tvm.runtime.tensor(np.zeros(shape, np.int8))
    kernel(tvm.runtime.tensor(w), tvm.runtime.tensor(delta), got)
    np.testing.assert_array_equal(got.numpy(), _hash_rounding(w, delta))


# ---- changing the mask -----------------------------------------------------------------------------------
def test_a_new_mask_leaves_what_the_last_one_trained(float_model):
    """Train A (conv3 at 1/2 + classifier), then B (conv1's weights): momentum built up under A
    moves nothing under B; conv3's rows [8:] never move."""
    a = {"weights": {"3": 0.5}, "classifier": True}
    b = {"weights": {"1": 1.0}}
    trainer = float_model.masked(a)
    float_model.train(trainer)
    after_a = trainer.params()
    check_untrained_unchanged(float_model, a, after_a)
    trainer.mask = mask_for(b, float_model.layers, resolve("full", float_model.layers))
    float_model.train(trainer)
    after_b = trainer.params()
    for name, value in after_a.items():
        if name == "conv1.weight":
            assert not np.array_equal(after_b[name], value)
        else:
            np.testing.assert_array_equal(after_b[name], value, err_msg=name)


def test_mask_refuses_what_the_step_does_not_train(float_model):
    trainer = float_model.union
    with pytest.raises(InputError, match=r"mask names 'conv9.weight', which this step does not train"):
        trainer.mask = {"conv9.weight": None}
    for bad in (0, 9, 2.5, True):
        with pytest.raises(InputError, match=r"mask of 'conv0.weight' is .*; give None \(all\) or a number "
                                             r"of output channels in 1\.\.8"):
            trainer.mask = {"conv0.weight": bad}
    with pytest.raises(InputError, match="mask must be a dict"):
        trainer.mask = ["conv0.weight"]
    trainer.mask = {"conv0.weight": 8}
    assert trainer.mask == {"conv0.weight": None}  # all its channels: the whole update
    trainer.mask = None
    assert trainer.mask is None


def test_mask_for_refuses_a_scheme_wider_than_the_union(float_model):
    layers = float_model.layers
    with pytest.raises(SchemeError, match="the scheme trains conv3.weight, which the shared training step "
                                          "does not"):
        mask_for({"weights": {"3": 1.0}}, layers, resolve("bias-only", layers))
    union = resolve({"weights": {"3": 0.25}}, layers)
    with pytest.raises(SchemeError, match="trains 8 output channels of conv3.weight, the shared training "
                                          "step only 4"):
        mask_for({"weights": {"3": 0.5}}, layers, union)
    assert mask_for({"weights": {"3": 0.25}}, layers, union) == {"conv3.weight[:4]": None}


def test_a_union_of_candidates_masks_each_like_its_own_build(float_model):
    """``union_scheme`` of two candidates: a step whose conv3 is itself split (at 8); the narrower
    candidate's mask keeps 4 of those 8 rows and learns what its own build learns."""
    layers = float_model.layers
    candidates = [{"weights": {"3": 0.25}, "classifier": True}, {"bias": {"last": 3}, "weights": {"3": 0.5}}]
    union = union_scheme(candidates, layers)
    wide = resolve(union, layers)
    for candidate in candidates:
        assert all(name in wide for name in resolve(candidate, layers))
    assert wide["conv3.weight"] == 8
    trainer = HostTrainer(TinyTrain(union, optimizer=SGD)(float_model.mod), float_model.params)
    trainer.mask = mask_for(candidates[0], layers, wide)
    assert trainer.mask == {"conv3.weight[:8]": 4, "linear4.weight": None, "linear4.bias": None}
    float_model.train(trainer)
    own = float_model.build(candidates[0])
    float_model.train(own)
    for name, value in own.params().items():
        np.testing.assert_allclose(trainer.params()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# ---- the library round trip ------------------------------------------------------------------------------
def test_an_exported_library_trains_like_the_build(float_model, tmp_path):
    union = float_model.union
    union.mask = None
    union.reset()
    path = union.export_library(tmp_path / "step.so")
    compiled_losses = float_model.train(union)
    loaded = HostTrainer(TinyTrain("full", optimizer=SGD)(float_model.mod), float_model.params, library=path)
    assert loaded.compile_seconds == 0
    assert float_model.train(loaded) == compiled_losses
    for name, value in union.params().items():
        np.testing.assert_array_equal(loaded.params()[name], value, err_msg=name)


def test_a_library_of_something_else_is_refused_in_one_line(float_model, tmp_path):
    full = TinyTrain("full", optimizer=SGD)(float_model.mod)
    float_model.build("last-layer").export_library(tmp_path / "classifier.so")
    onnx.save(tt.zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=4), tmp_path / "narrow.onnx")
    narrow_mod, narrow_params = tt.load_model(tmp_path / "narrow.onnx")
    narrow = HostTrainer(TinyTrain("full", optimizer=SGD)(narrow_mod), narrow_params)
    narrow.export_library(tmp_path / "narrow.so")
    (tmp_path / "text.so").write_text("not a library")
    cases = {"classifier.so": r"was built for another model or scheme \(train_step takes 'linear4.weight' "
                              r"where the module has 'conv0.weight'\)",
             "narrow.so": r"was built for another model \(Invalid conv0.weight.shape\[0\]",
             "text.so": "is not a training step HostTrainer.export_library wrote",
             "missing.so": "does not exist; write it with HostTrainer.export_library"}
    for name, message in cases.items():
        with pytest.raises(TinyTrainError, match=message) as err:
            HostTrainer(full, float_model.params, library=tmp_path / name)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)

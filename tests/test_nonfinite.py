"""Non-finite values stop, and nothing is lost: inf/NaN samples are refused, a step whose loss or
update is inf/NaN is not applied (host trainer and C), learning rates and momenta are checked
everywhere, float data never reaches an int8 model by a silent cast, and the int8 C kernels
have no signed overflow (UBSan) while agreeing with TVM's host build."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from conftest import require_tools

import tvm_tinytrain as tt
from tvm_tinytrain import micro, zoo
from tvm_tinytrain.cli import main
from tvm_tinytrain.errors import InputError, NonFiniteError
from tvm_tinytrain.micro import DeviceError

HUGE_LR = 1e38  # lr · gradient overflows float32 in the first step, while the loss is finite


def _small(tmp_path_factory, optimizer, int8=False):
    root = tmp_path_factory.mktemp("nonfinite")
    model = zoo.small_cnn(num_classes=5, input_hw=(8, 8), width=4, seed=1)
    onnx.save(zoo.quantize_qdq(model) if int8 else model, root / "m.onnx")
    mod, params = tt.load_model(root / "m.onnx", float_classifier=not int8)  # int8: integers throughout
    return mod, params, root


def _sample(seed=0):
    rng = np.random.default_rng(seed)
    # pixels of a few hundred: gradients well above 1, so HUGE_LR · gradient overflows
    return 300 * rng.standard_normal((1, 1, 8, 8)).astype(np.float32), int(rng.integers(0, 5))


@pytest.fixture(scope="module")
def float_case(tmp_path_factory):
    """(module, params, folder, HostTrainer) of the small CNN, SGD with momentum, a huge rate."""
    mod, params, root = _small(tmp_path_factory, None)
    train_mod = tt.relay.transform.TinyTrain("full", optimizer=tt.SGD(lr=HUGE_LR, momentum=0.9))(mod)
    return train_mod, params, root, tt.build(train_mod, params)


def _snapshot(trainer):
    return {n: v.numpy().copy() for n, v in trainer._values.items()}


# ---- inputs --------------------------------------------------------------------------------
def test_a_nan_pixel_is_refused_by_step_predict_and_evaluate(float_case):
    trainer = float_case[3]
    x, y = _sample()
    x[0, 0, 3, 4] = np.nan
    for call in (lambda: trainer.step(x, y), lambda: trainer.predict(x),
                 lambda: trainer.evaluate(np.stack([x, x]), [y, y])):
        with pytest.raises(InputError, match="inf/NaN"):
            call()
    x[0, 0, 3, 4] = np.inf
    with pytest.raises(InputError, match=r"first at index \[0, 0, 3, 4\]"):
        trainer.step(x, y)


# ---- a step that goes non-finite is not applied --------------------------------------------
def test_a_step_whose_update_overflows_raises_and_changes_nothing(float_case):
    trainer = float_case[3]
    trainer.reset()
    before = _snapshot(trainer)
    x, y = _sample()
    with pytest.raises(NonFiniteError, match=r"step 0: .* inf/NaN; the step was not applied.*lower the "
                                             r"learning rate \(now 1e\+38\)"):
        trainer.step(x, y)
    after = _snapshot(trainer)
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].tobytes() == after[name].tobytes(), name
    trainer.learning_rate = 0.05  # a sane rate trains on from the same state
    assert np.isfinite(trainer.step(x, y)) and trainer.steps_done == 1
    trainer.reset()


def test_resnet8_at_lr_1e6_stops_at_the_step_that_goes_non_finite(shared_model):
    """The user's case: ResNet-8 (float) at lr 1e6 goes inf/NaN at step 1 (its loss or, with other
    labels, thousands of values of conv7's update); the step raises and the parameters stay those
    of step 0."""
    mod, params = tt.load_model(shared_model("resnet8_cifar10_float.tflite"))
    trainer = tt.build(tt.relay.transform.TinyTrain("full", optimizer=tt.SGD(lr=1e6))(mod), params)
    rng = np.random.default_rng(0)
    xs, ys = rng.random((2, *trainer.input_shape)).astype(np.float32), rng.integers(0, 10, 2)
    with pytest.raises(NonFiniteError, match="step 1: .*inf/NaN.*lower the learning rate"):
        for x, y in zip(xs, ys):
            kept = trainer.params()
            trainer.step(x, y)
    for name, value in trainer.params().items():
        assert np.all(np.isfinite(value)) and value.tobytes() == kept[name].tobytes(), name


def test_export_onnx_refuses_non_finite_parameters(float_case, tmp_path):
    train_mod, params, _, trainer = float_case
    bad = dict(params)
    bad["conv0.weight"] = params["conv0.weight"].copy()
    bad["conv0.weight"].flat[3] = np.nan
    with pytest.raises(NonFiniteError, match="conv0.weight"):
        tt.export_onnx(train_mod, tmp_path / "bad.onnx", bad)
    assert not (tmp_path / "bad.onnx").exists()
    tt.export_onnx(trainer, tmp_path / "good.onnx")  # the trainer's own parameters are finite


# ---- the C step ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def c_project(float_case):
    require_tools("gcc", "make")
    train_mod, params, root, _ = float_case
    artifact = tt.build(train_mod, params, target="c")
    memory = artifact.metadata["memory"]
    assert memory["planned_sram_bytes"] == (memory["arena_bytes"] + memory["trainable_bytes"]
                                            + memory["optimizer_state_bytes"] + memory["rollback_bytes"])
    project = micro.create_project(artifact, "host", root / "host", {"sanitize": 1})
    project.build()
    return project


def _device_block(dev):
    return {**dev.params(), **dev.optimizer_state()}


def test_c_train_step_refuses_a_non_finite_step_and_keeps_every_byte(c_project, float_case):
    x, y = _sample()
    with c_project.session() as dev:
        before = _device_block(dev)
        with pytest.raises(NonFiniteError, match="step 0: .*update of .*not applied"):
            dev.train_step(x, y)
        assert dev.last_status == 5
        after = _device_block(dev)
        for name in before:
            assert before[name].tobytes() == after[name].tobytes(), name
        # a forward that overflows: the loss is inf, caught before anything is written
        huge = {n: np.full_like(v, 1e30) for n, v in before.items() if n.endswith(".weight")}
        dev.set_params(huge)
        with pytest.raises(NonFiniteError, match="the loss is inf/NaN"):
            dev.train_step(x, y)
        assert all(dev.params()[n].tobytes() == v.tobytes() for n, v in huge.items())
        dev.set_params(before)
        # the sample is checked on the host before sending, and on the device
        bad = x.copy()
        bad[0, 0, 0, 0] = np.nan
        with pytest.raises(InputError, match="inf/NaN"):
            dev.train_step(bad, y)
        with pytest.raises(InputError, match="inf/NaN"):
            dev.predict(bad)
        raw = bad.tobytes() + np.array([y], np.int64).tobytes()
        dev._call(b"T", raw, allow=(5,))
        assert dev.last_status == 5 and struct.unpack("<fQI", dev._call(b"T", raw, allow=(5,)))[2] == 2
        # the learning-rate setter refuses inf, NaN and negative rates and keeps the rate
        for rate in (float("nan"), float("inf"), -1.0):
            with pytest.raises(DeviceError, match="learning rate"):
                dev._call(b"L", struct.pack("<f", rate))
        assert dev.learning_rate == pytest.approx(HUGE_LR)
        with pytest.raises(InputError, match="learning rate"):
            dev.learning_rate = float("nan")
        dev.learning_rate = 0.05  # and the same step now trains, as on the host
        loss = dev.train_step(x, y)
        params = dev.params()
    ref = tt.build(float_case[0], float_case[1])
    ref.learning_rate = 0.05
    np.testing.assert_allclose(loss, ref.step(x, y), rtol=1e-5)
    for name, value in params.items():
        np.testing.assert_allclose(value, ref._values[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert dev.returncode == 0  # no sanitizer report


# ---- learning rates and momenta ----------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"lr": float("nan")}, {"lr": -1.0}, {"lr": float("inf")}, {"lr": 0},
                                    {"lr": "0.1"}, {"lr": 0.1, "momentum": 5}, {"lr": 0.1, "momentum": -0.1},
                                    {"lr": 0.1, "momentum": float("nan")}])
def test_sgd_refuses_rates_that_cannot_train(kwargs):
    with pytest.raises(ValueError, match="learning rate|momentum"):
        tt.SGD(**kwargs)


@pytest.mark.parametrize("kwargs", [{"lr": float("nan")}, {"lr": -1e-3}, {"lr": 1e-3, "beta1": 1.0},
                                    {"lr": 1e-3, "eps": float("nan")}])
def test_adam_refuses_rates_that_cannot_train(kwargs):
    with pytest.raises(ValueError, match="learning rate|beta|eps"):
        tt.Adam(**kwargs)


@pytest.mark.parametrize("flags,what", [(("--lr", "nan"), "--lr"), (("--lr", "-1"), "--lr"),
                                        (("--momentum", "5"), "--momentum")])
def test_cli_refuses_bad_rates_in_one_line(flags, what, capsys, tmp_path):
    onnx.save(zoo.small_cnn(num_classes=5, input_hw=(8, 8), width=4), tmp_path / "m.onnx")
    try:
        code = main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out.tar"), *flags])
    except SystemExit as done:
        code = done.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("tinytrain: error: ") and what in err, err
    assert not (tmp_path / "out.tar").exists()


# ---- int8 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_case(tmp_path_factory):
    """The small CNN as int8 QDQ, its biases trained at a rate that drives them to the int32 limit."""
    mod, params, root = _small(tmp_path_factory, None, int8=True)
    train_mod = tt.relay.transform.TinyTrain("bias-only", optimizer=tt.SGD(lr=1e9),
                                             integer_rounding="nearest")(mod)
    return mod, train_mod, params, root


def test_float_data_for_an_int8_model_is_refused(int8_case):
    mod, train_mod, params, _ = int8_case
    trainer = tt.build(train_mod, params)
    x, y = _sample()
    with pytest.raises(InputError, match=r"tt.quantize_input\(mod, x\)"):
        trainer.step(x, y)
    with pytest.raises(InputError, match="do not fit int8"):
        trainer.predict(np.full((1, 1, 8, 8), 300))
    trainer.step(tt.quantize_input(mod, x), y)  # quantized, it trains


def test_int8_c_has_no_signed_overflow_under_ubsan_and_equals_tvm(int8_case):
    """Biases pushed to the int32 limit: the conv kernels' accumulator + bias saturates in the IR
    (no UB: the sanitizers abort on any report), and host C equals TVM's build to the bit."""
    require_tools("gcc", "make")
    mod, train_mod, params, root = int8_case
    ref = tt.build(train_mod, params)
    rng = np.random.default_rng(3)
    xs = tt.quantize_input(mod, rng.standard_normal((6, 1, 1, 8, 8)).astype(np.float32))
    ys = rng.integers(0, 5, 6)
    ref_losses = [ref.step(x, y) for x, y in zip(xs, ys)]
    biases = [n for n in ref.trainable if ref._values[n].numpy().dtype == np.int32]
    assert any(np.abs(ref._values[n].numpy()).max() == 2147483008 for n in biases), "no bias saturated"
    project = micro.create_project(tt.build(train_mod, params, target="c"), "host", root / "ubsan",
                                   {"sanitize": 1})
    project.build()
    assert "-fno-sanitize-recover=all" in project.build_log
    with project.session() as dev:
        losses = [dev.train_step(x, y) for x, y in zip(xs, ys)]
        got = dev.params()
        dev.predict(xs[0])
        with pytest.raises(InputError, match="quantize_input"):
            dev.train_step(xs[0].astype(np.float32), ys[0])
    assert dev.returncode == 0
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    for name, value in got.items():
        expected = ref._values[name].numpy()
        if value.dtype == np.float32:
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(value, expected), name

"""Dense models: the MLPerf Tiny anomaly-detection autoencoders (``toycar_ad_*``), rank-2 input.

Three files of one network (ten fully connected layers, 640 → 128 → … → 8 → … → 640): float32,
weight-only int8 (float activations, int8 weights with scales: TFLite's "dynamic range"
quantization) and full int8 with a QUANTIZE at the input and a DEQUANTIZE at the output.
References: LiteRT's interpreter (reference kernels; its hybrid kernels for the weight-only
file) and a float64 numpy forward of the weights LiteRT reads out of the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import litert_reference, require_tools, shared_model
from tvm import relax

import tvm_tinytrain as tt
from relay_passes.plain_calls import PlainTIRCalls

FLOAT, WEIGHT_INT8, FULL_INT8 = ("toycar_ad_float.tflite", "toycar_ad_weight_int8.tflite",
                                 "toycar_ad_int8_float_io.tflite")


def _ours(name: str, **options):
    mod, params = tt.load_model(shared_model(name), **options)
    vm = relax.VirtualMachine(tvm.compile(PlainTIRCalls(mod), target="llvm"), tvm.cpu())
    weights = [tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]]
    return mod, lambda x: vm["main"](tvm.runtime.tensor(x), *weights).numpy()


def _litert(name: str):
    return litert_reference(shared_model(name))


def _inputs(count: int, seed: int = 0) -> list[np.ndarray]:
    """Log-mel-like frames: a fixed spectral profile, per-frame gain, noise (the int8 file's
    input range is about [-85, 19])."""
    rng = np.random.default_rng(seed)
    profile = np.random.default_rng(99).normal(-10, 6, 128)
    frames = profile + rng.normal(0, 1.5, (count, 5, 1)) + rng.normal(0, 1.0, (count, 5, 128))
    return list(frames.reshape(count, 1, 640).astype(np.float32))


def test_float_autoencoder_matches_litert():
    mod, ours = _ours(FLOAT)
    assert tuple(int(d) for d in mod["main"].params[0].ty.shape) == (1, 640)
    assert [layer.kind for layer in tt.layer_table(mod)] == ["linear"] * 10
    _, ref = _litert(FLOAT)
    for x in _inputs(20):
        expected = ref(x)
        np.testing.assert_allclose(ours(x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def _float64_forward_of_the_files_weights(interp, x: np.ndarray) -> np.ndarray:
    """The weight-only file as the float model it stands for: every FULLY_CONNECTED with its int8
    weight times its per-channel scale (read by LiteRT), in float64."""
    details = {d["index"]: d for d in interp.get_tensor_details()}
    y = x.astype(np.float64)
    for op in interp._get_ops_details():
        assert op["op_name"] == "FULLY_CONNECTED"
        w_index, b_index = op["inputs"][1], op["inputs"][2]
        q = details[w_index]["quantization_parameters"]
        assert details[w_index]["dtype"] == np.int8 and q["quantized_dimension"] == 0
        w = (interp.get_tensor(w_index).astype(np.float64) - q["zero_points"][:, None]) \
            * q["scales"][:, None]
        y = y @ w.T + interp.get_tensor(b_index).astype(np.float64)
        if op["index"] < 9:  # every layer but the output has a fused ReLU
            y = np.maximum(y, 0)
    return y


def test_weight_only_int8_is_the_float_model_of_its_dequantized_weights():
    """Read as the float model it stands for (never its raw int8 values as floats): equal to a
    float64 forward of the file's weights × scales, and close to LiteRT's hybrid kernels, which
    also quantize the activations on the fly."""
    mod, ours = _ours(WEIGHT_INT8)
    assert str(mod["main"].params[0].ty.dtype) == "float32"
    interp, hybrid = _litert(WEIGHT_INT8)  # its hybrid reference kernels
    close = total = 0
    for x in _inputs(20):
        expected = _float64_forward_of_the_files_weights(interp, x)
        got = ours(x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        approx = hybrid(x)
        close += int(np.sum(np.abs(got - approx) <= 0.02 * np.abs(approx).max()))
        total += approx.size
    assert close / total >= 0.99


def test_full_int8_with_float_io_matches_litert_within_one_lsb():
    mod, ours = _ours(FULL_INT8, float_classifier=False)
    assert str(mod["main"].params[0].ty.dtype) == "int8"  # the file's QUANTIZE is quantize_input
    interp, ref = _litert(FULL_INT8)
    out = interp._get_ops_details()[-1]
    assert out["op_name"] == "DEQUANTIZE"
    scale = interp.get_tensor_details()[out["inputs"][0]]["quantization"][0]
    within = total = 0
    for x in _inputs(50):
        lsb = np.abs(ours(tt.quantize_input(mod, x)) - ref(x)) / scale
        within += int(np.sum(lsb <= 1 + 1e-3))
        total += lsb.size
    assert within / total >= 0.999


@pytest.mark.parametrize("name", [FLOAT, WEIGHT_INT8, FULL_INT8])
def test_autoencoder_fine_tunes_on_its_own_input(name):
    """``loss="mse"`` and ``step(x)`` with no target: the model learns to reproduce its input,
    and the reconstruction error (the anomaly score) of held-out frames goes down."""
    mod, params = tt.load_model(shared_model(name))
    data = (lambda d: tt.quantize_input(mod, d)) if name == FULL_INT8 else (lambda d: d)
    lr = 1e-5 if name == FULL_INT8 else 1e-6  # benchmarks/autoencoder.py's rates
    train_mod = tt.relay.transform.TinyTrain(scheme="full", loss="mse",
                                             optimizer=tt.SGD(lr=lr, momentum=0.9))(mod)
    trainer = tt.build(train_mod, params)
    train, held = data(np.stack(_inputs(100, seed=1))), data(np.stack(_inputs(30, seed=2)))
    before = np.mean([trainer.anomaly_score(x) for x in held])
    losses = [trainer.step(x) for x in train]
    after = np.mean([trainer.anomaly_score(x) for x in held])
    assert np.all(np.isfinite(losses))
    assert after < 0.6 * before, (before, after)


def test_cross_entropy_step_without_a_label_is_refused(small_trainer):
    with pytest.raises(tt.InputError, match="needs a label"):
        small_trainer.step(np.zeros(small_trainer.input_shape, np.float32))


def test_int8_autoencoder_on_qemu_fits_256kb_and_equals_the_host_path(tmp_path):
    """The full int8 autoencoder's whole training step as C for the emulated Cortex-M7 under a
    256 KB budget: the host C build and QEMU give the same bits, and TVM's host build the same
    losses."""
    require_tools("gcc", "arm-none-eabi-gcc", "qemu-system-arm", "make")
    from tvm_tinytrain import micro

    mod, params = tt.load_model(shared_model(FULL_INT8))
    # all biases and the last two layers' weights (the whole int8 network, 258 KB, would not fit)
    scheme = {"bias": {"last": 10}, "weights": {"8": 1.0, "9": 1.0}}
    # nearest rounding: stochastic rounding hashes float bits that the two builds sum in other orders
    train_mod = tt.relay.transform.TinyTrain(scheme, loss="mse", optimizer=tt.SGD(lr=1e-5),
                                             integer_rounding="nearest")(mod)
    artifact = tt.build(train_mod, params, target="c", budget="256KB")
    ref = tt.build(train_mod, params)
    xs = tt.quantize_input(mod, np.stack(_inputs(3, seed=3)))
    ref_losses = [ref.step(x) for x in xs]
    runs = []
    for template, options in (("host", {"sanitize": 1}), ("qemu_cortex_m7", {"ram_kb": "256"})):
        project = micro.create_project(artifact, template, tmp_path / template, options)
        project.build()
        with project.session() as dev:
            losses = [dev.train_step(x) for x in xs]  # no target: the input, dequantized
            runs.append((np.array(losses, np.float32), dev.params(), dev.predict(xs[0]),
                         dev.stack()[0], project))
    (host_losses, host_params, host_out, _, _), (losses, qemu_params, qemu_out, high_water, qemu) = runs
    np.testing.assert_allclose(host_losses, ref_losses, rtol=1e-5)
    np.testing.assert_array_equal(losses, host_losses)
    for name, value in qemu_params.items():
        np.testing.assert_array_equal(value, host_params[name], err_msg=name)
    np.testing.assert_array_equal(qemu_out, host_out)
    ram = qemu.static_ram()
    assert ram["arena"] == artifact.metadata["memory"]["arena_bytes"]
    assert ram["data"] + ram["bss"] + high_water <= 256 * 1024


def test_weight_only_autoencoder_through_the_host_c_path_equals_tvm(tmp_path):
    """Rank-2 float input through the C artifact and the host template: the same losses and
    updated parameters as TVM's host build."""
    require_tools("gcc", "make")
    from tvm_tinytrain import micro

    mod, params = tt.load_model(shared_model(WEIGHT_INT8))
    scheme = {"bias": {"last": 10}, "weights": {"8": 1.0}}
    train_mod = tt.relay.transform.TinyTrain(scheme, loss="mse", optimizer=tt.SGD(lr=1e-5))(mod)
    artifact = tt.build(train_mod, params, target="c")
    ref = tt.build(train_mod, params)
    xs = np.stack(_inputs(3, seed=4))
    ref_losses = [ref.step(x) for x in xs]
    project = micro.create_project(artifact, "host", tmp_path / "host")
    project.build()
    with project.session() as dev:
        losses = [dev.train_step(x) for x in xs]
        device_params = dev.params()
        assert dev.anomaly_score(xs[0]) == pytest.approx(ref.anomaly_score(xs[0]), rel=1e-5)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for name, value in device_params.items():
        np.testing.assert_allclose(value, ref._values[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)

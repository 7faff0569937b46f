"""Post-training quantization (``tvm_tinytrain.ptq``): the int8 .tflite it writes from the demo's
float CNN runs in LiteRT's reference kernels, agrees with the int8 graph ``load_model`` imports to
within one output step, keeps the float model's accuracy on held-out digits, and stores what
TFLite's int8 scheme says (per-channel symmetric weights, int32 biases at s_x·s_w, asymmetric
activations). Models it cannot write are refused in one line, before a file exists."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import litert_reference

import tvm_tinytrain as tt
from tvm_tinytrain.demo import digit_splits, float_cnn, pretrain
from tvm_tinytrain.errors import InputError, ModelStructureError, OutputError
from tvm_tinytrain.ptq import quantize_tflite
from tvm_tinytrain.relay.transform import TinyTrain

pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def digits():
    return digit_splits(0)[0]  # digits 0-4: x_train, x_test, y_train, y_test


@pytest.fixture(scope="module")
def quantized(digits, tmp_path_factory):
    """(float trainer, its held-out accuracy, the int8 file) for the demo's CNN, pretrained 3 epochs."""
    trainer, accuracy = pretrain(0, 3, 0.005, digits)
    path = quantize_tflite(trainer, digits[0][:300], tmp_path_factory.mktemp("ptq") / "digits_int8.tflite")
    return trainer, accuracy, path


def _int8(x_nchw: np.ndarray, scale: float, zero: int) -> np.ndarray:
    """TFLite's quantization of float images, NCHW → the file's NHWC."""
    return np.clip(np.round(x_nchw.transpose(0, 2, 3, 1) / scale) + zero, -128, 127).astype(np.int8)


def test_litert_agrees_with_the_imported_int8_graph_within_one_step(quantized, digits):
    _, _, path = quantized
    interp, run = litert_reference(path)
    (s_in, z_in), (s_out, z_out) = (interp.get_input_details()[0]["quantization"],
                                    interp.get_output_details()[0]["quantization"])
    rng = np.random.default_rng(1)
    samples = np.concatenate([_int8(digits[1], s_in, z_in),
                              rng.integers(-128, 128, (100, 8, 8, 1), dtype=np.int8)])
    mod, params = tt.load_model(path, float_classifier=False)  # the file's int8 classifier, exactly
    imported = tt.build(TinyTrain(scheme="last-layer", optimizer=tt.SGD(lr=0.01))(mod), params)
    reference = np.stack([run(x[None])[0] for x in samples]).astype(np.int64)
    ours = np.stack([imported.predict(x[None]).reshape(-1) for x in samples])
    steps = np.round(ours / s_out).astype(np.int64) + z_out
    assert np.abs(steps - reference).max() <= 1
    assert len(np.unique(reference.argmax(1))) == 5  # not a constant output


def test_int8_accuracy_is_within_two_points_of_the_float_model(quantized, digits):
    trainer, float_accuracy, path = quantized
    _, x_test, _, y_test = digits
    assert trainer.evaluate(x_test, y_test) == float_accuracy
    interp, run = litert_reference(path)
    s_in, z_in = interp.get_input_details()[0]["quantization"]
    logits = np.stack([run(x[None])[0] for x in _int8(x_test, s_in, z_in)])
    int8_accuracy = float(np.mean(logits.argmax(1) == y_test))
    assert float_accuracy > 0.9
    assert abs(int8_accuracy - float_accuracy) <= 0.02


def test_the_file_holds_tflite_int8_quantization(quantized):
    trainer, _, path = quantized
    interp, _ = litert_reference(path)
    scale, zero = interp.get_input_details()[0]["quantization"]
    assert (scale, zero) == (pytest.approx(1 / 255), -128)  # images in [0, 1], asymmetric
    tensors = {t["name"]: t for t in interp.get_tensor_details()}
    float_params = trainer.params()
    convs = [(name, t) for name, t in tensors.items() if name.endswith("/weight")]
    assert len(convs) == 5
    w = float_params["conv0.weight"]  # OIHW; the file's first conv weight is OHWI
    weight = next(t for name, t in convs if t["shape"].tolist() == [16, 3, 3, 1])
    q = weight["quantization_parameters"]
    expected = np.abs(w.reshape(16, -1)).max(axis=1) / 127
    np.testing.assert_allclose(q["scales"], expected, rtol=1e-6)
    assert q["quantized_dimension"] == 0 and not np.any(q["zero_points"])
    stored = interp.get_tensor(weight["index"]).astype(np.float64).transpose(0, 3, 1, 2)
    assert np.abs(stored).max() == 127
    step = expected[:, None, None, None]
    assert np.all(np.abs(stored * step - w) <= step / 2 + 1e-7)  # rounded to the nearest step
    bias = next(t for name, t in tensors.items() if name.endswith("/bias") and t["shape"].tolist() == [16])
    assert bias["dtype"] == np.int32
    np.testing.assert_allclose(bias["quantization_parameters"]["scales"], scale * expected, rtol=1e-6)
    np.testing.assert_allclose(interp.get_tensor(bias["index"]) * scale * expected,
                               float_params["conv0.bias"], atol=float(scale * expected.max()))
    activations = [t for t in tensors.values() if t["dtype"] == np.int8 and "/" not in t["name"]]
    assert any(t["quantization"][1] != -128 for t in activations)  # the logits: a zero point inside


def test_quantizing_the_float_twin_of_its_own_file_gives_it_back(quantized, digits, tmp_path):
    """The float twin of an int8 file (``dequantize=True``: a float TFLite import, NHWC input, each
    activation clipped to its int8 range, average pooling) quantized again: the same weights, the
    same scales where calibration reached the clip, the same answers."""
    _, _, path = quantized
    mod, params = tt.load_model(path, dequantize=True)
    nhwc = digits[0][:300].transpose(0, 2, 3, 1)
    again = quantize_tflite(mod, nhwc, tmp_path / "again.tflite", params=params)
    (first, run_first), (second, run_second) = litert_reference(path), litert_reference(again)
    old = {t["name"]: t for t in first.get_tensor_details()}
    new = {t["name"]: t for t in second.get_tensor_details()}
    assert sorted(old) == sorted(new)
    for name in (n for n in old if n.endswith("/weight")):
        np.testing.assert_array_equal(second.get_tensor(new[name]["index"]),
                                      first.get_tensor(old[name]["index"]))
    assert new["input"]["quantization"] == old["input"]["quantization"]
    for name in (n for n in old if "/" not in n and old[n]["dtype"] == np.int8):
        (s_old, z_old), (s_new, z_new) = old[name]["quantization"], new[name]["quantization"]
        assert s_new == pytest.approx(s_old, rel=0.02) and abs(z_new - z_old) <= 1
    x = np.clip(np.round(digits[1].transpose(0, 2, 3, 1) * 255) - 128, -128, 127).astype(np.int8)
    same = [np.argmax(run_first(s[None])) == np.argmax(run_second(s[None])) for s in x]
    assert np.mean(same) >= 0.97


def _loaded(tmp_path, model: onnx.ModelProto):
    path = tmp_path / "float.onnx"
    onnx.save(model, path)
    return tt.load_model(path)


def test_padding_tflite_cannot_express_is_refused_before_writing(tmp_path):
    # zoo.small_cnn pads its stride-2 conv (1, 1) on an 8x8 input: TFLite's SAME pads (0, 1)
    mod, params = _loaded(tmp_path, tt.zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=8))
    out = tmp_path / "q.tflite"
    with pytest.raises(ModelStructureError) as err:
        quantize_tflite(mod, np.zeros((4, 1, 8, 8)), out, params=params)
    message = str(err.value)
    assert "\n" not in message and "(1, 1, 1, 1)" in message and "(0, 0, 1, 1)" in message
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "float.onnx"]


def test_bad_calibration_and_destination_are_one_line(tmp_path):
    mod, params = _loaded(tmp_path, float_cnn())
    out = tmp_path / "q.tflite"
    for data, kind, words in [(np.zeros((4, 8, 8, 1)), InputError, "(n, 1, 8, 8)"),
                              (np.zeros((0, 1, 8, 8)), InputError, "n >= 1"),
                              (np.full((2, 1, 8, 8), np.nan), InputError, "NaN")]:
        with pytest.raises(kind, match="calibration") as err:
            quantize_tflite(mod, data, out, params=params)
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="params"):
        quantize_tflite(mod, np.zeros((2, 1, 8, 8)), out)
    with pytest.raises(OutputError, match="folder"):
        quantize_tflite(mod, np.zeros((2, 1, 8, 8)), tmp_path, params=params)
    assert not out.exists()
    quantize_tflite(mod, np.random.default_rng(0).random((2, 1, 8, 8)), out, params=params)
    assert out.read_bytes()[4:8] == b"TFL3"

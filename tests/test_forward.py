"""Forward of imported models vs the frameworks' own runtimes."""

import numpy as np
import onnx
import pytest

import tvm_tinytrain as tt
from tests.onnx_ops import OP_MODELS, ort_session
from tvm_tinytrain import zoo


def _relative_error(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))


def _build(path):
    mod, params = tt.load_model(path)
    return tt.build(tt.relay.transform.TinyTrain("full", optimizer=tt.SGD(lr=1e-3))(mod), params)


ZOO = {
    "small_cnn": lambda: zoo.small_cnn(num_classes=10, input_hw=(8, 8)),
    "mobilenet_v2_bn": lambda: zoo.mobilenet_v2(resolution=32, batchnorm=True),
    "proxyless_nas": lambda: zoo.proxyless_nas(resolution=32),
    "mcunet_like": lambda: zoo.mcunet_like(resolution=32),
}


@pytest.mark.parametrize("name", sorted(OP_MODELS) + sorted(ZOO))
def test_onnx_forward_matches_onnxruntime(name, tmp_path):
    model = OP_MODELS[name]() if name in OP_MODELS else ZOO[name]()
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    trainer = _build(path)
    session = ort_session(str(path))
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(size=trainer.input_shape).astype(np.float32)
        ref = session.run(None, {session.get_inputs()[0].name: x})[0]
        assert _relative_error(trainer.predict(x), ref) < 1e-5


@pytest.mark.parametrize("name", ["resnet8_cifar10_float", "vww_96_float"])
def test_float_tflite_forward_matches_litert(name, shared_model):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    path = shared_model(f"{name}.tflite")
    trainer = _build(path)
    interp = Interpreter(model_path=str(path),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.uniform(0, 1, trainer.input_shape).astype(np.float32)
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        probs = interp.get_tensor(out["index"])  # the file ends in SOFTMAX; we return logits
        logits = trainer.predict(x)
        ours = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert _relative_error(ours, probs) < 1e-5
        assert np.argmax(ours) == np.argmax(probs)


def test_export_onnx_round_trip(tmp_path):
    """A fine-tuned model written back as ONNX runs in onnxruntime with the tuned weights."""
    path = tmp_path / "m.onnx"
    onnx.save(OP_MODELS["batchnorm_folded"](), path)
    trainer = _build(path)
    rng = np.random.default_rng(2)
    x = rng.normal(size=trainer.input_shape).astype(np.float32)
    for _ in range(3):
        trainer.step(x, 1)
    out = tt.export_onnx(trainer, tmp_path / "tuned.onnx")
    session = ort_session(str(out))
    ref = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert _relative_error(trainer.predict(x), ref) < 1e-5
    original = ort_session(str(path))
    before = original.run(None, {"input": x})[0]
    assert _relative_error(before, ref) > 1e-3  # the weights did change


def test_export_onnx_of_tflite_model(tmp_path, shared_model):
    trainer = _build(shared_model("resnet8_cifar10_float.tflite"))
    x = np.random.default_rng(3).uniform(0, 1, trainer.input_shape).astype(np.float32)
    trainer.step(x, 3)
    session = ort_session(str(tt.export_onnx(trainer, tmp_path / "r8.onnx")))
    ref = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert _relative_error(trainer.predict(x), ref) < 1e-5

"""export_tuned: what a device (or the host trainer) learned, written back into the model file, checked
against the format's own interpreter (LiteRT's reference kernels, onnxruntime)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import litert_reference, require_tools, shared_model
from onnx import numpy_helper

import tvm_tinytrain as tt
from tvm_tinytrain import micro, zoo
from tvm_tinytrain.codegen import Artifact
from tvm_tinytrain.demo import float_cnn
from tvm_tinytrain.errors import InputError, OutputError
from tvm_tinytrain.export_tuned import export_project, requantize
from tvm_tinytrain.ptq import quantize_tflite
from tvm_tinytrain.tflite_patch import TfliteFile
from tvm_tinytrain.tflite_writer import (
    CONV_2D,
    CONV_OPTIONS,
    FC_OPTIONS,
    FLOAT32,
    FULLY_CONNECTED,
    INT8,
    Op,
    Tensor,
    write_model,
)

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same numbers whichever tests ran before it."""
    global RNG
    RNG = np.random.default_rng(7)
SPARSE = {"bias": {"last": 3}, "weights": {"3": 0.5}, "classifier": True}  # layer 3: first half of channels


# ---- models ------------------------------------------------------------------------------------------
def _int8_tflite(tmp_path, per_tensor_classifier: bool = False):
    """The demo CNN (8x8x1 → 10) quantized by ptq: per-channel convs, a fully connected classifier;
    ``per_tensor_classifier`` re-quantizes the classifier per tensor, as TFLite's converter does."""
    onnx.save(float_cnn(seed=3), tmp_path / "f.onnx")
    mod, params = tt.load_model(tmp_path / "f.onnx")
    path = quantize_tflite(mod, RNG.uniform(0, 1, (32, 1, 8, 8)), tmp_path / "m.tflite", params=params)
    if per_tensor_classifier:
        f = TfliteFile(path.read_bytes())
        fc = f.graph.Operators(f.graph.OperatorsLength() - 1)
        w, b, x = fc.Inputs(1), fc.Inputs(2), fc.Inputs(0)
        real = f.values(w) * f.quantization(w)[0][:, None]
        scale = np.abs(real).max() / 127
        f.set_values(w, np.round(real / scale))
        f.set_quantization(w, [scale], [0], 0)
        s_b = np.float32(f.quantization(x)[0][0] * scale)
        f.set_values(b, np.round(f.values(b) * f.quantization(b)[0] / s_b))
        f.set_quantization(b, [s_b], [0], 0)
        path.write_bytes(bytes(f.data))
    return path


def _float_tflite(tmp_path, weight_only: bool = False):
    """conv 3x3 VALID (+ReLU) on 6x6x2 → fully connected to 3; ``weight_only``: the conv's weight int8
    per output channel (a weight-only file)."""
    w = RNG.normal(0, 0.5, (4, 3, 3, 2)).astype(np.float32)  # OHWI
    if weight_only:
        scales = np.abs(w).reshape(4, -1).max(axis=1) / 127
        conv_w = Tensor("w", (4, 3, 3, 2), INT8, np.round(w / scales[:, None, None, None]).astype(np.int8),
                        list(scales), [0] * 4)
    else:
        conv_w = Tensor("w", (4, 3, 3, 2), FLOAT32, w)
    tensors = [Tensor("x", (1, 6, 6, 2), FLOAT32), conv_w,
               Tensor("b", (4,), FLOAT32, RNG.normal(0, 0.1, 4).astype(np.float32)),
               Tensor("c", (1, 4, 4, 4), FLOAT32),
               Tensor("fw", (3, 64), FLOAT32, RNG.normal(0, 0.1, (3, 64)).astype(np.float32)),
               Tensor("fb", (3,), FLOAT32, np.zeros(3, np.float32)), Tensor("y", (1, 3), FLOAT32)]
    conv = [(0, "int8", 1), (1, "int32", 1), (2, "int32", 1), (3, "int8", 1)]  # VALID, stride 1, ReLU
    ops = [Op(CONV_2D, [0, 1, 2], [3], CONV_OPTIONS, conv), Op(FULLY_CONNECTED, [3, 4, 5], [6], FC_OPTIONS)]
    path = tmp_path / ("weight_only.tflite" if weight_only else "float.tflite")
    path.write_bytes(write_model(tensors, ops, [0], [6]))
    return path


def _compile(path, tmp_path, scheme, lr=0.05, **load):
    """(mod, artifact folder, host trainer) for ``path`` trained with ``scheme``."""
    mod, params = tt.load_model(path, **load)
    train_mod = tt.relay.transform.TinyTrain(scheme, optimizer=tt.SGD(lr=lr))(mod)
    artifact = tt.build(train_mod, params, target="c", model=path)
    folder = artifact.export(tmp_path / "artifact")
    return mod, folder, tt.build(train_mod, params)


def _samples(mod, shape, n, int8: bool, classes: int = 10):
    """n samples of ``shape`` with labels: handwritten digits for an 8x8 input (a task a classifier
    learns with clear margins, so top-1 is not decided by rounding), random ones otherwise."""
    if shape[1:3] == (8, 8) or shape[2:] == (8, 8):
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = digits.target < classes
        x = (digits.images[keep][:n] / 16.0).reshape(n, *shape).astype(np.float32)
        y = digits.target[keep][:n]
    else:
        x, y = RNG.uniform(0, 1, (n, *shape)).astype(np.float32), RNG.integers(0, classes, n)
    return (tt.quantize_input(mod, x) if int8 else x), y


def _litert(path, xs) -> np.ndarray:
    _, run = litert_reference(path)
    return np.array([run(x) for x in xs]).reshape(len(xs), -1)


def _top1_agreement(a, b) -> float:
    a, b = (np.asarray(v).reshape(len(v), -1).argmax(1) for v in (a, b))
    return float(np.mean(a == b))


def _untouched(source, exported, written: list[str]) -> None:
    """Every tensor export did not write holds the source's bytes and quantization."""
    a, b = TfliteFile(source.read_bytes()), TfliteFile(exported.read_bytes())
    assert a.graph.OperatorsLength() == b.graph.OperatorsLength()
    for i in range(a.graph.TensorsLength()):
        if a.name(i) in written:
            continue
        assert a.name(i) == b.name(i)
        if a.model.Buffers(a.tensor(i).Buffer()).DataLength():
            assert a.values(i).tobytes() == b.values(i).tobytes(), a.name(i)
        qa, qb = a.quantization(i), b.quantization(i)
        assert (qa is None) == (qb is None)
        if qa is not None:
            assert all(np.array_equal(u, v) for u, v in zip(qa, qb)), a.name(i)


# ---- on the device -------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["host", "qemu_cortex_m7"])
def test_int8_tflite_trained_on_the_device_runs_in_litert_as_the_device_predicts(tmp_path, template):
    require_tools(*(("gcc", "make") if template == "host" else ("arm-none-eabi-gcc", "qemu-system-arm")))
    path = _int8_tflite(tmp_path)
    mod, folder, _ = _compile(path, tmp_path, SPARSE)
    project = micro.create_project(folder, template, tmp_path / "proj")
    project.build()
    xs, ys = _samples(mod, (1, 8, 8, 1), 200, int8=True)
    with project.session() as dev:
        for x, y in zip(xs[:60], ys[:60]):
            dev.train_step(x, y)
        predicted = np.array([dev.predict(x) for x in xs])
        held = dev.params()
        dev.save()
    # the device read again; the eval set calibrates the classifier's int8 output range
    report = export_project(tmp_path / "proj", tmp_path / "tuned.tflite", samples=xs)
    assert report.format == "tflite" and report.path.is_file()
    assert "requantized to int8 per channel" in report.summary()
    ours = _litert(report.path, xs)
    assert _top1_agreement(ours, predicted) >= 0.99

    meta = json.loads((tmp_path / "proj" / "model" / "metadata.json").read_text())
    layers = {layer["weight"]: layer for layer in meta["source"]["layers"]}
    f = TfliteFile(report.path.read_bytes())
    conv3 = f.values(layers["conv3.weight"]["w"]["ref"]).transpose(0, 3, 1, 2)  # OHWI → OIHW
    assert conv3.dtype == np.int8 and np.array_equal(conv3[:16], held["conv3.weight[:16]"])
    source = TfliteFile(path.read_bytes()).values(layers["conv3.weight"]["w"]["ref"]).transpose(0, 3, 1, 2)
    assert not np.array_equal(conv3[:16], source[:16]) and np.array_equal(conv3[16:], source[16:])
    for name in ("dwconv2.bias", "conv3.bias"):
        layer = layers[name.replace("bias", "weight")]
        assert np.array_equal(f.values(layer["b"]["ref"]), held[name])
    _untouched(path, report.path, report.tensors)
    assert len(report.path.read_bytes()) == len(path.read_bytes())  # all in place: per channel already


def test_float_onnx_trained_on_the_device_equals_onnxruntime(tmp_path):
    require_tools("gcc", "make")
    import onnxruntime as ort

    onnx.save(zoo.small_cnn(num_classes=5, input_hw=(8, 8), width=4, seed=1), tmp_path / "m.onnx")
    scheme = {"bias": {"last": 4}, "weights": {"3": 0.5, "4": 1}}
    mod, folder, _ = _compile(tmp_path / "m.onnx", tmp_path, scheme)
    project = micro.create_project(folder, "host", tmp_path / "proj")
    project.build()
    xs = RNG.standard_normal((30, 1, 1, 8, 8)).astype(np.float32)
    with project.session() as dev:
        for x, y in zip(xs[:20], RNG.integers(0, 5, 20)):
            dev.train_step(x, y)
        predicted = [dev.predict(x) for x in xs]
        dev.save()
    report = export_project(tmp_path / "proj", tmp_path / "tuned.onnx")
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for x, p in zip(xs, predicted):
        np.testing.assert_allclose(sess.run(None, {name: x})[0], p, rtol=1e-5, atol=1e-5)
    source = {t.name: t for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    for t in onnx.load(report.path).graph.initializer:
        if t.name not in report.tensors:
            assert t.SerializeToString() == source[t.name].SerializeToString(), t.name


# ---- from the host trainer (params=) -------------------------------------------------------------
def test_a_per_tensor_classifier_becomes_per_channel_and_litert_runs_it(tmp_path):
    path = _int8_tflite(tmp_path, per_tensor_classifier=True)
    mod, folder, trainer = _compile(path, tmp_path, "last-layer", lr=0.1)
    xs, ys = _samples(mod, (1, 8, 8, 1), 150, int8=True)
    for x, y in zip(xs[:50], ys[:50]):
        trainer.step(x, y)
    report = export_project(folder, tmp_path / "tuned.tflite", params=trainer.params(), samples=xs)
    f = TfliteFile(report.path.read_bytes())
    fc = f.graph.Operators(f.graph.OperatorsLength() - 1)
    scales, zeros, dim = f.quantization(fc.Inputs(1))
    assert scales.size == 10 and dim == 0 and not zeros.any()
    w = trainer.params()["linear4.weight"]
    q, expect = requantize(w, 0)  # an independent check of the formula: max |w| / 127 per row
    np.testing.assert_allclose(scales, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert np.array_equal(f.values(fc.Inputs(1)), q)
    assert f.quantization(fc.Inputs(2))[0].size == 10
    assert _top1_agreement(_litert(report.path, xs), [trainer.predict(x) for x in xs]) >= 0.99
    _untouched(path, report.path, report.tensors)


def test_weight_headroom_is_written_as_the_device_holds_it(tmp_path):
    path = _int8_tflite(tmp_path)
    mod, folder, trainer = _compile(path, tmp_path, {"weights": {"3": 1.0}, "bias": {"last": 2}},
                                    weight_headroom={3: 1})
    xs, ys = _samples(mod, (1, 8, 8, 1), 150, int8=True)
    for x, y in zip(xs[:40], ys[:40]):
        trainer.step(x, y)
    report = export_project(folder, tmp_path / "tuned.tflite", params=trainer.params(), samples=xs)
    src, out = TfliteFile(path.read_bytes()), TfliteFile(report.path.read_bytes())
    w = src.graph.Operators(3).Inputs(1)
    assert np.array_equal(out.values(w).transpose(0, 3, 1, 2), trainer.params()["conv3.weight"])
    np.testing.assert_allclose(out.quantization(w)[0], src.quantization(w)[0] * 2, rtol=1e-7)
    b = src.graph.Operators(3).Inputs(2)
    np.testing.assert_allclose(out.quantization(b)[0], src.quantization(b)[0] * 2, rtol=1e-7)
    assert _top1_agreement(_litert(report.path, xs), [trainer.predict(x) for x in xs]) >= 0.99


def test_a_dequantized_twin_is_written_back_requantized(tmp_path):
    """--dequantize trains the int8 file's float twin; export requantizes every layer it trained."""
    path = _int8_tflite(tmp_path)
    mod, folder, trainer = _compile(path, tmp_path, SPARSE, dequantize=True)
    xs, ys = _samples(mod, (1, 8, 8, 1), 150, int8=False)
    for x, y in zip(xs[:50], ys[:50]):
        trainer.step(x, y)
    report = export_project(folder, tmp_path / "tuned.tflite", params=trainer.params())
    assert "layer 3 requantized" in report.summary()
    int8_mod, _ = tt.load_model(path)
    xq = tt.quantize_input(int8_mod, xs)
    assert _top1_agreement(_litert(report.path, xq), [trainer.predict(x) for x in xs]) >= 0.9


@pytest.mark.parametrize("weight_only", [False, True])
def test_float_and_weight_only_tflite(tmp_path, weight_only):
    path = _float_tflite(tmp_path, weight_only)
    mod, folder, trainer = _compile(path, tmp_path, "full", lr=0.05)
    xs, ys = _samples(mod, (1, 6, 6, 2), 40, int8=False, classes=3)
    for x, y in zip(xs[:20], ys[:20]):
        trainer.step(x, y)
    report = export_project(folder, tmp_path / "tuned.tflite", params=trainer.params())
    ours, theirs = _litert(report.path, xs), np.array([trainer.predict(x) for x in xs]).reshape(len(xs), -1)
    if weight_only:  # the conv requantized per channel: within its rounding
        assert _top1_agreement(ours, theirs) >= 0.95
        assert "layer 0 requantized" in report.summary()
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        f = TfliteFile(report.path.read_bytes())
        ohwi = f.values(f.graph.Operators(0).Inputs(1))
        np.testing.assert_array_equal(ohwi.transpose(0, 3, 1, 2), trainer.params()["conv0.weight"])


@pytest.mark.parametrize("headroom", [0, 1])
def test_qdq_onnx_with_a_float_classifier(tmp_path, headroom):
    import onnxruntime as ort

    qdq = zoo.quantize_qdq(zoo.small_cnn(num_classes=5, input_hw=(8, 8), width=4, seed=1))
    onnx.save(qdq, tmp_path / "q.onnx")
    scheme = {"bias": {"last": 3}, "weights": {"3": 1}, "classifier": True}
    mod, folder, trainer = _compile(tmp_path / "q.onnx", tmp_path, scheme, weight_headroom={3: headroom})
    xs, ys = _samples(mod, (1, 1, 8, 8), 120, int8=False, classes=5)
    xq = tt.quantize_input(mod, xs)
    for x, y in zip(xq[:40], ys[:40]):
        trainer.step(x, y)
    report = export_project(folder, tmp_path / "tuned.onnx", params=trainer.params(), samples=xq)
    model = onnx.load(report.path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    meta = json.loads((folder / "metadata.json").read_text())
    conv3 = next(layer for layer in meta["source"]["layers"] if layer["weight"] == "conv3.weight")
    assert np.array_equal(inits[conv3["w"]["ref"]], trainer.params()["conv3.weight"])  # int8, bit for bit
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ours = [sess.run(None, {name: x})[0] for x in xs]
    assert _top1_agreement(ours, [trainer.predict(x) for x in xq]) >= 0.99


# ---- bad input -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    path = _float_tflite(tmp)
    _, folder, trainer = _compile(path, tmp, "last-layer")
    return tmp, folder, trainer.params()


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_bad_input_is_one_line_and_writes_nothing(float_project, tmp_path):
    tmp, folder, params = float_project
    with pytest.raises(InputError) as err:
        export_project(folder, tmp_path / "tuned.onnx", params=params)
    assert "*.tflite" in _one_line(err)
    with pytest.raises(InputError) as err:
        export_project(tmp_path / "nowhere", tmp_path / "t.tflite", params=params)
    assert "does not exist" in _one_line(err)
    bad = {**params, "linear1.weight": np.full_like(params["linear1.weight"], np.nan)}
    with pytest.raises(InputError) as err:
        export_project(folder, tmp_path / "t.tflite", params=bad)
    assert "inf/NaN" in _one_line(err)
    with pytest.raises(InputError) as err:
        export_project(folder, tmp_path / "t.tflite", params={})
    assert "params lacks" in _one_line(err)
    with pytest.raises(OutputError):
        export_project(folder, tmp_path / "missing" / "t.tflite", params=params)
    project = micro.create_project(folder, "host", tmp_path / "proj")
    with pytest.raises(micro.DeviceError) as err:
        export_project(project.path, tmp_path / "t.tflite", serial_port=str(tmp_path / "ttyNOPE"))
    assert "does not exist" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_a_project_compiled_before_the_source_copy_says_to_recompile(float_project, tmp_path):
    tmp, folder, params = float_project
    old = Artifact.load(folder)
    old.blobs.clear()
    old.metadata.pop("source")
    old.export(tmp_path / "old")
    with pytest.raises(InputError) as err:
        export_project(tmp_path / "old", tmp_path / "t.tflite", params=params)
    assert "compile the model again" in _one_line(err)


def test_a_changed_source_copy_is_refused(float_project, tmp_path):
    tmp, folder, params = float_project
    copy = tmp_path / "copy"
    Artifact.load(folder).export(copy)
    data = bytearray((copy / "source.tflite").read_bytes())
    data[-1] ^= 1
    (copy / "source.tflite").write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        export_project(copy, tmp_path / "t.tflite", params=params)
    assert "sha256" in _one_line(err)


def test_the_artifact_keeps_the_model_file_through_tar_and_project(float_project, tmp_path):
    tmp, folder, _ = float_project
    artifact = Artifact.load(folder)
    assert artifact.blobs["source.tflite"] == (tmp / "float.tflite").read_bytes()
    artifact.export(tmp_path / "a.tar")
    again = Artifact.load(tmp_path / "a.tar")
    assert again.blobs == artifact.blobs and again.metadata["source"] == artifact.metadata["source"]
    project = micro.create_project(again, "host", tmp_path / "proj")
    assert (project.path / "model" / "source.tflite").read_bytes() == (tmp / "float.tflite").read_bytes()


# ---- a real model ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_vww_int8_sparse_on_the_device(tmp_path):
    require_tools("gcc", "make")
    path = shared_model("vww_96_int8.tflite")
    scheme = {"bias": {"last": 6}, "weights": {"24": 0.5, "26": 0.25}, "classifier": True}
    mod, folder, _ = _compile(path, tmp_path, scheme, lr=0.3)
    project = micro.create_project(folder, "host", tmp_path / "proj")
    project.build()
    # two kinds of image the classifier can learn apart: noise tinted red (1) or blue (0)
    ys = RNG.integers(0, 2, 100)
    images = RNG.uniform(0, 0.6, (100, 1, 96, 96, 3))
    images[ys == 1, ..., 0] += 0.4
    images[ys == 0, ..., 2] += 0.4
    xs = tt.quantize_input(mod, images.astype(np.float32))
    with project.session() as dev:
        for x, y in zip(xs[:40], ys[:40]):
            dev.train_step(x, y)
        predicted = [dev.predict(x) for x in xs]
        dev.save()
    report = export_project(tmp_path / "proj", tmp_path / "tuned.tflite", samples=xs)
    assert _top1_agreement(_litert(report.path, xs), predicted) >= 0.99
    _untouched(path, report.path, report.tensors)


@pytest.mark.parametrize("build", ["conv_variants", "matmul_add", "batchnorm_folded"])
def test_float_onnx_layouts_missing_biases_and_folded_batchnorm(tmp_path, build):
    """A depthwise multiplier, a grouped conv and a conv without bias (which gets one), a MatMul's
    (in, out) weight and the bias of the Add after it, a BatchNormalization folded into its conv
    (written folded, the BatchNormalization made an Identity): onnxruntime equals the trainer."""
    import onnx_ops

    onnx.save(getattr(onnx_ops, build)(), tmp_path / "m.onnx")
    mod, folder, trainer = _compile(tmp_path / "m.onnx", tmp_path, "full", lr=0.05)
    xs = RNG.standard_normal((12, 1, 2, 6, 6)).astype(np.float32)
    for x, y in zip(xs[:6], RNG.integers(0, onnx_ops.CLASSES, 6)):
        trainer.step(x, y)
    report = export_project(folder, tmp_path / "tuned.onnx", params=trainer.params())
    sess = onnx_ops.ort_session(report.path)
    for x in xs:
        np.testing.assert_allclose(sess.run(None, {"input": x})[0], trainer.predict(x), rtol=1e-5, atol=1e-5)
    if build == "batchnorm_folded":
        assert "BatchNormalization folded" in report.summary()
        assert "BatchNormalization" not in {n.op_type for n in onnx.load(report.path).graph.node}

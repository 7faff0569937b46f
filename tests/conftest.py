"""Shared fixtures: the pre-trained models in ../shared/models, a small ONNX file, a built trainer."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from tvm_tinytrain import zoo

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"


def _missing(what: Path):
    """Skip (fail under CI=true, which must have the models) when a shared model is absent."""
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{what} is missing; CI must provide ../shared/models beside the project")
    pytest.skip(f"{what} not found: put the shared models in ../shared/models beside the project")


def shared_model(name: str) -> Path:
    """The path of ``../shared/models/<name>``; skips (fails under CI=true) when it is missing."""
    path = MODELS / name
    if not path.is_file():
        _missing(path)
    return path


@pytest.fixture(name="shared_model")
def _shared_model_fixture():
    """``shared_model("vww_96_float.tflite")`` inside a test, without importing conftest."""
    return shared_model


@pytest.fixture
def models_dir() -> Path:
    if not MODELS.is_dir():
        _missing(MODELS)
    return MODELS


def small_cnn():
    return zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=8)


def tiny_int8_mobilenet(folder: Path) -> Path:
    """A tiny int8 MobileNet (16x16 input, 4 classes; stem 3x3/2 of 8 channels and two inverted
    residuals of expansion 4, the second with a stride-2 depthwise; the peak of its arena is block 1's
    expansion and depthwise outputs), saved as ``folder/tiny_int8.onnx``."""
    blocks = [zoo._Block(4, 3, 8, 1), zoo._Block(4, 3, 8, 2)]
    model = zoo._mobile_net("tiny_mobilenet", resolution=16, num_classes=4, seed=0, stem=8, blocks=blocks,
                            last_channels=None, act="relu6")
    path = Path(folder) / "tiny_int8.onnx"
    onnx.save(zoo.quantize_qdq(model), path)
    return path


@pytest.fixture
def small_onnx(tmp_path) -> Path:
    """zoo.small_cnn (1x1x8x8 input, 10 classes) saved as an ONNX file."""
    path = tmp_path / "small_cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


@pytest.fixture(scope="session")
def small_trainer(tmp_path_factory):
    """A HostTrainer for small_cnn (full scheme, cross-entropy, SGD), built once per session.

    Shared: a test that calls ``step`` changes the weights every later test sees.
    """
    import tvm_tinytrain as tt

    path = tmp_path_factory.mktemp("small") / "small_cnn.onnx"
    onnx.save(small_cnn(), path)
    mod, params = tt.load_model(path)
    train_mod = tt.relay.transform.TinyTrain(
        scheme="full", loss="cross_entropy", optimizer=tt.SGD(lr=0.01)
    )(mod)
    return tt.build(train_mod, params)


def litert_reference(path):
    """LiteRT's interpreter on ``path`` with its reference kernels (the same answer on every CPU),
    and ``run(x) -> output`` through it."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(x):
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out["index"]).copy()
    return interp, run


def require_tools(*names: str) -> None:
    """Skip when a tool is not on PATH; under CI=true (which installs them all) fail instead."""
    import shutil

    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{', '.join(missing)} missing; CI must install them (see .ci/run)")
    pytest.skip(f"{', '.join(missing)} not installed")


def small_step_artifact(root):
    """The C artifact of a small CNN's sparse step (SGD with momentum): the device link's tests."""
    import tvm_tinytrain as tt

    onnx.save(zoo.small_cnn(num_classes=5, input_hw=(8, 8), width=4, seed=1), root / "m.onnx")
    mod, params = tt.load_model(root / "m.onnx")
    scheme = {"bias": {"last": 4}, "weights": {"3": 0.5, "4": 1.0}}
    train_mod = tt.relay.transform.TinyTrain(scheme, optimizer=tt.SGD(lr=0.05, momentum=0.9))(mod)
    return tt.build(train_mod, params, target="c")

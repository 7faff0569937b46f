"""Tests for tvm_tinytrain.zoo and its PyTorch twin (benchmarks/torch_twin.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.numpy_reference import conv2d_nchw
from tests.onnx_ops import OP_MODELS, ort_session
from tvm_tinytrain import zoo

ROOT = Path(__file__).resolve().parents[1]
BUILDERS = {
    "small_cnn": lambda: zoo.small_cnn(),
    "small_cnn_rgb_16x16": lambda: zoo.small_cnn(
        num_classes=4, input_hw=(16, 16), in_channels=3, width=4, seed=3
    ),
    "mobilenet_v2": lambda: zoo.mobilenet_v2(),
    "mobilenet_v2_bn": lambda: zoo.mobilenet_v2(batchnorm=True),
    "proxyless_nas": lambda: zoo.proxyless_nas(),
    "mcunet_like": lambda: zoo.mcunet_like(),
}


def _input_shape(model: onnx.ModelProto) -> list[int]:
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def _random_input(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, _input_shape(model)).astype(np.float32)


def _run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort_session(model)
    return session.run(["logits"], {"input": x})[0]


def _params(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.fixture(scope="module", params=list(BUILDERS))
def built(request: pytest.FixtureRequest) -> tuple[str, onnx.ModelProto]:
    return request.param, BUILDERS[request.param]()


def test_model_is_valid_onnx(built: tuple[str, onnx.ModelProto]) -> None:
    _, model = built
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _input_shape(model)[0] == 1
    assert {n.op_type for n in model.graph.node} <= {
        "Conv",
        "Relu",
        "Clip",
        "Add",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
        "BatchNormalization",
    }


def test_onnxruntime_gives_finite_logits(built: tuple[str, onnx.ModelProto]) -> None:
    _, model = built
    num_classes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    logits = _run_ort(model, _random_input(model))
    assert logits.shape == (1, num_classes)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert 1e-3 < np.abs(logits).max() < 100.0  # activations neither vanished nor exploded


def test_weights_are_seeded() -> None:
    same = (
        zoo.mobilenet_v2(seed=5).SerializeToString() == zoo.mobilenet_v2(seed=5).SerializeToString()
    )
    assert same
    assert (
        zoo.mobilenet_v2(seed=5).SerializeToString() != zoo.mobilenet_v2(seed=6).SerializeToString()
    )


def test_initializer_names_are_readable() -> None:
    names = set(_params(zoo.mobilenet_v2()))
    assert {
        "features.0.weight",
        "features.1.conv.0.weight",
        "features.2.conv.0.weight",
        "features.2.conv.2.bias",
        "features.18.weight",
        "classifier.weight",
        "classifier.bias",
    } <= names


def test_mobilenet_v2_structure() -> None:
    model = zoo.mobilenet_v2()
    params = _params(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 52  # stem + 17 blocks (first without expansion) + head conv
    assert params["features.0.weight"].shape == (16, 3, 3, 3)  # _make_divisible(32 * 0.35) = 16
    assert params["features.17.conv.2.weight"].shape == (112, 336, 1, 1)  # 6 * 56 -> 320 * 0.35
    assert params["features.18.weight"].shape == (1280, 112, 1, 1)  # last conv not scaled
    assert params["classifier.weight"].shape == (10, 1280)
    assert sum(n.op_type == "Add" for n in model.graph.node) == 10
    clip_bounds = {tuple(n.input[1:]) for n in model.graph.node if n.op_type == "Clip"}
    assert len(clip_bounds) == 1
    low, high = (float(params[name]) for name in clip_bounds.pop())
    assert (low, high) == (0.0, 6.0)


def test_mobilenet_v2_batchnorm_variant() -> None:
    model = zoo.mobilenet_v2(batchnorm=True)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == len(convs) == 52
    assert all(len(conv.input) == 2 for conv in convs)  # no conv bias before BN
    assert all(
        len(conv.input) == 3 for conv in zoo.mobilenet_v2().graph.node if conv.op_type == "Conv"
    )
    assert np.all(_params(model)["features.0.bn.running_var"] > 0)


def test_count_macs_small_cnn_by_hand() -> None:
    # conv1 8x8x8x(1*9), conv2 4x4x16x(8*9), depthwise 4x4x16x9, pointwise 4x4x16x16, fc 16x10
    assert zoo.count_macs(zoo.small_cnn()) == 4608 + 18432 + 2304 + 4096 + 160


def test_mobilenet_v2_macs_match_published() -> None:
    macs = zoo.count_macs(zoo.mobilenet_v2(width_mult=0.35, resolution=128, num_classes=10))
    print(f"MobileNetV2-w0.35 @128, 10 classes: {macs / 1e6:.2f} M MACs")
    assert 0.9 * 17e6 <= macs <= 1.1 * 19e6  # TinyTraining paper: 17 M
    # TF-slim's table (1000 classes): 1.0@224 300 M, 0.35@224 59 M, 0.35@128 20 M.
    assert zoo.count_macs(zoo.mobilenet_v2(1.0, 224, 1000)) == pytest.approx(300e6, rel=0.01)
    assert zoo.count_macs(zoo.mobilenet_v2(0.35, 224, 1000)) == pytest.approx(59e6, rel=0.01)
    assert zoo.count_macs(zoo.mobilenet_v2(0.35, 128, 1000)) == pytest.approx(20e6, rel=0.02)


def test_proxyless_and_mcunet_macs() -> None:
    proxyless = zoo.count_macs(zoo.proxyless_nas())
    mcunet = zoo.count_macs(zoo.mcunet_like())
    print(f"ProxylessNAS-w0.3: {proxyless / 1e6:.2f} M, MCUNet-like: {mcunet / 1e6:.2f} M MACs")
    assert proxyless == pytest.approx(19e6, rel=0.1)
    assert 20e6 <= mcunet <= 25e6
    # ProxylessNAS-mobile at full width, 224x224, 1000 classes: 320 M published.
    assert zoo.count_macs(zoo.proxyless_nas(1.0, 224, 1000)) == pytest.approx(320e6, rel=0.05)


# -- independent float64 reference for small_cnn --------------------------------------------


def _conv2d_f64(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, groups: int
) -> np.ndarray:
    """x (C, H, W), w (O, C/groups, k, k), 'same' padding k // 2."""
    return conv2d_nchw(x[None], w, stride, w.shape[-1] // 2, groups)[0] + b[:, None, None]


def _small_cnn_f64(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    p = {name: value.astype(np.float64) for name, value in params.items()}
    h = x[0].astype(np.float64)
    h = np.maximum(_conv2d_f64(h, p["conv1.weight"], p["conv1.bias"], 1, 1), 0.0)
    h = np.maximum(_conv2d_f64(h, p["conv2.weight"], p["conv2.bias"], 2, 1), 0.0)
    h = np.clip(_conv2d_f64(h, p["dwconv.weight"], p["dwconv.bias"], 1, h.shape[0]), 0.0, 6.0)
    h = np.maximum(_conv2d_f64(h, p["pwconv.weight"], p["pwconv.bias"], 1, 1), 0.0)
    pooled = h.mean(axis=(1, 2))
    return (p["fc.weight"] @ pooled + p["fc.bias"])[None, :]


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_classes": 4, "input_hw": (16, 12), "in_channels": 3, "width": 4}]
)
def test_small_cnn_matches_numpy_float64(kwargs: dict) -> None:
    model = zoo.small_cnn(**kwargs, seed=7)
    x = _random_input(model, seed=1)
    expected = _small_cnn_f64(_params(model), x)
    got = _run_ort(model, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# -- PyTorch twin ----------------------------------------------------------------------------


def _torch_module_from_onnx():
    """benchmarks/torch_twin.py's builder (benchmarks/ is a folder of scripts, not installed)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.torch_twin import torch_module_from_onnx

    return torch_module_from_onnx


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v2_bn", "small_cnn", "proxyless_nas"])
def test_torch_twin_matches_onnxruntime(name: str) -> None:
    torch = pytest.importorskip("torch")
    torch_module_from_onnx = _torch_module_from_onnx()

    model = BUILDERS[name]()
    twin = torch_module_from_onnx(model)
    x = _random_input(model, seed=2)
    expected = _run_ort(model, x)
    for mode in (twin.eval, twin.train):  # BN must keep inference semantics in train mode
        mode()
        with torch.no_grad():
            got = twin(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_torch_twin_parameters_are_the_initializers() -> None:
    torch = pytest.importorskip("torch")
    torch_module_from_onnx = _torch_module_from_onnx()

    model = zoo.mobilenet_v2(batchnorm=True)
    twin = torch_module_from_onnx(model)
    params = _params(model)
    trainable = {
        k: v
        for k, v in params.items()
        if not k.endswith(("running_mean", "running_var", "min", "max"))
    }
    assert sum(p.numel() for p in twin.parameters()) == sum(v.size for v in trainable.values())
    twin_first = next(twin.parameters()).detach().numpy()
    np.testing.assert_array_equal(twin_first, params["features.0.weight"])
    # A training step moves the weights (gradients reach every parameter).
    logits = twin(torch.from_numpy(_random_input(model)))
    torch.nn.functional.cross_entropy(logits, torch.tensor([3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in twin.parameters())


@pytest.mark.parametrize("name", sorted(OP_MODELS))
def test_torch_twin_matches_onnxruntime_on_op_models(name: str) -> None:
    """Every op of the ONNX frontend, in float32 and (after ``.double()``) float64."""
    torch = pytest.importorskip("torch")
    torch_module_from_onnx = _torch_module_from_onnx()

    model = OP_MODELS[name]()
    twin = torch_module_from_onnx(model)
    x = np.random.default_rng(4).normal(size=_input_shape(model)).astype(np.float32)
    expected = _run_ort(model, x)
    with torch.no_grad():
        got32 = twin(torch.from_numpy(x)).numpy()
        twin.double()
        got64 = twin(torch.from_numpy(x).double()).numpy()
    assert got32.dtype == np.float32 and got64.dtype == np.float64
    assert all(t.dtype == torch.float64 for t in twin.state_dict().values() if t.is_floating_point())
    for got in (got32, got64):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

"""Gradients of every supported op and of whole models vs float64 finite differences,
and vs PyTorch autograd when torch is installed."""

import numpy as np
import onnx
import pytest

from tests.gradcheck import LossAndGrad, finite_difference_check
from tests.onnx_ops import OP_MODELS


@pytest.fixture(params=sorted(OP_MODELS))
def op_model(request, tmp_path):
    path = tmp_path / f"{request.param}.onnx"
    onnx.save(OP_MODELS[request.param](), path)
    return path


def test_op_gradient_matches_finite_differences(op_model):
    x = np.random.default_rng(0).normal(size=(1, 2, 6, 6))
    fn = LossAndGrad(op_model, x, label=1)
    assert finite_difference_check(fn) < 1e-3


def test_mse_gradient_matches_finite_differences(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(OP_MODELS["relu6"](), path)
    x = np.random.default_rng(1).normal(size=(1, 2, 6, 6))
    fn = LossAndGrad(path, x, label=np.linspace(-1, 1, 4).reshape(1, 4), loss="mse")
    assert finite_difference_check(fn) < 1e-3


@pytest.mark.parametrize("name", ["resnet8_cifar10_float", "vww_96_float"])
def test_whole_model_gradient_matches_finite_differences(name, shared_model):
    path = shared_model(f"{name}.tflite")
    shape = {"resnet8_cifar10_float": (1, 32, 32, 3), "vww_96_float": (1, 96, 96, 3)}[name]
    x = np.random.default_rng(2).uniform(0, 1, shape)
    fn = LossAndGrad(path, x, label=1)
    assert finite_difference_check(fn, per_tensor=2) < 1e-3


def test_op_gradient_matches_torch(op_model):
    """The gradient w.r.t. the input (name- and layout-agnostic) equals torch autograd's."""
    torch = pytest.importorskip("torch")
    from benchmarks.torch_twin import torch_module_from_onnx

    x = np.random.default_rng(3).normal(size=(1, 2, 6, 6))
    fn = LossAndGrad(op_model, x, label=2, wrt_input=True)
    ours = fn.grads(fn.params)["<input>"]
    net = torch_module_from_onnx(onnx.load(op_model)).double()
    x_t = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(net(x_t), torch.tensor([2]))
    loss.backward()
    assert abs(fn.loss(fn.params) - loss.item()) < 1e-9 * max(1.0, abs(loss.item()))
    np.testing.assert_allclose(ours, x_t.grad.numpy(), rtol=1e-6, atol=1e-10)

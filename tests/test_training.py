"""Training steps: hand-computed updates, real learning on digits, the shared float models."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_tinytrain as tt
from tvm_tinytrain import zoo


@pytest.fixture
def linear_model(tmp_path):
    """input (1,2,3,3) → GlobalAveragePool → Flatten → Gemm(3 classes): gradients by hand."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "linear.onnx"
    onnx.save(model, path)
    return path, w.astype(np.float64), b.astype(np.float64)


def _hand_gradient(x, label, w, b):
    h = x.astype(np.float64).mean(axis=(2, 3))[0]
    z = w @ h + b
    p = np.exp(z - z.max())
    p /= p.sum()
    p[label] -= 1.0
    return np.outer(p, h), p


def _trainer(path, optimizer):
    mod, params = tt.load_model(path)
    return tt.build(tt.relay.transform.TinyTrain("full", optimizer=optimizer)(mod), params)


def _samples(n):
    rng = np.random.default_rng(1)
    return [(rng.normal(size=(1, 2, 3, 3)).astype(np.float32), int(rng.integers(0, 3)))
            for _ in range(n)]


def test_sgd_step_equals_hand_computed_update(linear_model):
    path, w, b = linear_model
    trainer = _trainer(path, tt.SGD(lr=0.1))
    for x, y in _samples(3):
        gw, gb = _hand_gradient(x, y, w, b)
        w, b = w - 0.1 * gw, b - 0.1 * gb
        trainer.step(x, y)
        params = trainer.params()
        np.testing.assert_allclose(params["linear0.weight"], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(params["linear0.bias"], b, rtol=1e-5, atol=1e-6)


def test_sgd_on_a_linear_layer_never_copies_or_differentiates_its_weight_whole(linear_model):
    """The classifier runs as one dense kernel over W (no transposed copy) and SGD sums
    each weight's gradient into its update (no weight-gradient tensor); the numbers are
    the hand-computed ones above."""
    path, w, b = linear_model
    mod, params = tt.load_model(path)
    step = tt.relay.transform.TinyTrain("full", optimizer=tt.SGD(lr=0.1))(mod)
    calls = step["train_step"].script()
    assert "linear_sgd_update" in calls and "dense" in calls
    assert "permute_dims(w" not in calls and "R.matmul" not in calls.split("R.nn.log_softmax")[0]
    trainer = tt.build(step, params)
    (x, y), = _samples(1)
    gw, _ = _hand_gradient(x, y, w, b)
    trainer.step(x, y)
    (after,) = [v for v in trainer.params().values() if v.shape == w.shape]
    np.testing.assert_allclose(after, w - 0.1 * gw, rtol=1e-5, atol=1e-6)


def test_momentum_step_equals_hand_computed_update(linear_model):
    path, w, b = linear_model
    trainer = _trainer(path, tt.SGD(lr=0.05, momentum=0.9))
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for x, y in _samples(3):
        gw, gb = _hand_gradient(x, y, w, b)
        vw, vb = 0.9 * vw + gw, 0.9 * vb + gb
        w, b = w - 0.05 * vw, b - 0.05 * vb
        trainer.step(x, y)
    np.testing.assert_allclose(trainer.params()["linear0.weight"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainer.params()["linear0.bias"], b, rtol=1e-5, atol=1e-6)


def test_learning_rate_set_between_steps_is_the_rate_of_the_next_step(linear_model):
    """The learning rate is a runtime scalar, not a constant of the graph: a schedule sets it
    between steps (here with momentum, and the cosine decay of ``fit``), no recompile."""
    path, w, b = linear_model
    trainer = _trainer(path, tt.SGD(lr=0.05, momentum=0.9))
    assert trainer.learning_rate == pytest.approx(0.05)
    samples = _samples(4)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for lr, (x, y) in zip((0.2, 0.0, 0.01, 0.07), samples):
        gw, gb = _hand_gradient(x, y, w, b)
        vw, vb = 0.9 * vw + gw, 0.9 * vb + gb
        w, b = w - np.float32(lr) * vw, b - np.float32(lr) * vb
        trainer.learning_rate = lr
        trainer.step(x, y)
    np.testing.assert_allclose(trainer.params()["linear0.weight"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainer.params()["linear0.bias"], b, rtol=1e-5, atol=1e-6)
    with pytest.raises(tt.InputError, match="learning rate"):
        trainer.learning_rate = float("nan")

    # fit's cosine schedule: lr_t = ½·lr·(1 + cos(π t / T)) from the current rate, restored after
    trainer.reset()
    assert trainer.learning_rate == pytest.approx(0.05)  # reset: back to the rate it was built with
    xs, ys = np.stack([x for x, _ in samples]), np.array([y for _, y in samples])
    order = np.random.default_rng(3).permutation(len(ys))
    _, w, b = linear_model
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for t, i in enumerate(order):
        lr = np.float32(0.5 * 0.05 * (1 + np.cos(np.pi * t / len(ys))))
        gw, gb = _hand_gradient(xs[i], ys[i], w, b)
        vw, vb = 0.9 * vw + gw, 0.9 * vb + gb
        w, b = w - lr * vw, b - lr * vb
    trainer.fit(xs, ys, seed=3, lr_schedule="cosine")
    np.testing.assert_allclose(trainer.params()["linear0.weight"], w, rtol=1e-5, atol=1e-6)
    assert trainer.learning_rate == pytest.approx(0.05)
    with pytest.raises(tt.InputError, match="lr_schedule"):
        trainer.fit(xs, ys, lr_schedule="step")

    # steps: that many samples, a new permutation per epoch, the last epoch cut short
    trainer.reset()
    assert len(trainer.fit(xs, ys, seed=5, steps=6)) == 6
    after_fit = trainer.params()
    trainer.reset()
    rng = np.random.default_rng(5)
    for i in [*rng.permutation(len(ys)), *rng.permutation(len(ys))[:2]]:
        trainer.step(xs[i], ys[i])
    for name, value in trainer.params().items():
        np.testing.assert_array_equal(after_fit[name], value, err_msg=name)


def test_adam_step_equals_hand_computed_update(linear_model):
    path, w, b = linear_model
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    trainer = _trainer(path, tt.Adam(lr=lr))
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, (x, y) in enumerate(_samples(3), start=1):
        gw, _ = _hand_gradient(x, y, w, b)
        m, v = b1 * m + (1 - b1) * gw, b2 * v + (1 - b2) * gw * gw
        w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        trainer.step(x, y)
        b = trainer.params()["linear0.bias"].astype(np.float64)  # follow the bias as trained
    np.testing.assert_allclose(trainer.params()["linear0.weight"], w, rtol=1e-4, atol=1e-6)


def test_step_returns_the_loss_before_the_update(linear_model):
    path, w, b = linear_model
    trainer = _trainer(path, tt.SGD(lr=0.1))
    x, y = _samples(1)[0]
    h = x.astype(np.float64).mean(axis=(2, 3))[0]
    z = w @ h + b
    expected = np.log(np.exp(z - z.max()).sum()) + z.max() - z[y]
    assert trainer.step(x, y) == pytest.approx(expected, rel=1e-5)


def test_small_cnn_learns_digits(tmp_path):
    """A CNN built by the test as ONNX reaches >= 90 % held-out accuracy on real digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25, random_state=0,
                                              stratify=digits.target)
    path = tmp_path / "digits.onnx"
    onnx.save(zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=16, seed=0), path)
    trainer = _trainer(path, tt.SGD(lr=0.005, momentum=0.9))
    trainer.fit(x_tr, y_tr, epochs=4, seed=0)
    assert trainer.evaluate(x_te, y_te) >= 0.90


@pytest.mark.parametrize("name,lr", [("resnet8_cifar10_float", 1e-4), ("vww_96_float", 1e-3)])
def test_shared_float_models_lower_the_loss(name, lr, shared_model):
    trainer = _trainer(shared_model(f"{name}.tflite"), tt.SGD(lr=lr))
    rng = np.random.default_rng(4)
    batch = [(rng.uniform(0, 1, trainer.input_shape).astype(np.float32), k % trainer.num_classes)
             for k in range(4)]
    first = [trainer.step(x, y) for x, y in batch]
    for _ in range(6):
        last = [trainer.step(x, y) for x, y in batch]
    assert sum(last) < 0.7 * sum(first)

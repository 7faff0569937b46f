"""Sparse update: schemes, pruned gradients, partial channels, reordering, the memory plan."""

import numpy as np
import onnx
import pytest
import tvm

import tvm_tinytrain as tt
from tests.gradcheck import LossAndGrad
from tvm_tinytrain import zoo
from tvm_tinytrain.memory_report import memory_report
from tvm_tinytrain.scheme import resolve

PAPER_STYLE = {"bias": {"last": 3}, "weights": {"2": 1.0, "3": 0.25}, "classifier": True}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "small.onnx"
    onnx.save(zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=8, seed=1), path)
    mod, params = tt.load_model(path)
    return path, mod, params


def _ops(func, name: str) -> list:
    return [b for block in func.body.blocks for b in block.bindings
            if isinstance(b.value, tvm.relax.Call) and getattr(b.value.op, "name", "") == name]


def test_scheme_resolves_paper_format(small):
    _, mod, _ = small
    layers = tt.layer_table(mod)
    trainable = resolve(PAPER_STYLE, layers)
    assert trainable == {  # biases of the last 3 layers, layer 2 whole, layer 3 at 1/4
        "dwconv2.weight": None, "dwconv2.bias": None, "conv3.weight": 4,  # ceil(0.25 * 16)
        "conv3.bias": None, "linear4.weight": None, "linear4.bias": None,
    }


@pytest.mark.parametrize("bad,words", [
    ({"weights": {"9": 1.0}}, "layers 0..4"),
    ({"weights": {"1": 1.5}}, "(0, 1]"),
    ({"weights": {"1": 0}}, "(0, 1]"),
    ({"bias": {"last": 0}}, "trains nothing"),
    ({"colour": 1}, "unknown key"),
    ('{"bias": ', "not valid JSON"),
])
def test_bad_schemes_are_clear(small, bad, words):
    _, mod, _ = small
    with pytest.raises(tt.SchemeError, match=None) as err:
        tt.relay.transform.TinyTrain(scheme=bad)(mod)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_scheme_from_json_file(small, tmp_path):
    _, mod, _ = small
    path = tmp_path / "s.json"
    path.write_text('{"bias": {"last": 1}, "classifier": true}')
    step = tt.relay.transform.TinyTrain(scheme=str(path))(mod)["train_step"]
    assert [str(n) for n in step.attrs["tinytrain.trainable"]] == ["linear4.weight", "linear4.bias"]


def test_no_input_gradient_below_the_first_trained_layer(small):
    _, mod, _ = small
    full = tt.relay.transform.TinyTrain("full")(mod)["train_step"]
    last = tt.relay.transform.TinyTrain("last-layer")(mod)["train_step"]
    from_two = tt.relay.transform.TinyTrain({"weights": {"2": 1.0}, "classifier": True})(mod)
    assert len(_ops(last, "relax.nn.conv2d_transpose")) == 0
    # layers 3 (conv) needs an input gradient to reach layer 2; layer 2 and below need none
    assert len(_ops(from_two["train_step"], "relax.nn.conv2d_transpose")) == 1
    assert len(_ops(full, "relax.nn.conv2d_transpose")) == 3  # layers 1, 2, 3
    counts = [len(f.body.blocks[0].bindings) for f in (full, from_two["train_step"], last)]
    assert counts[0] > counts[1] > counts[2]


def test_partial_update_computes_only_its_channels(small):
    _, mod, _ = small
    step = tt.relay.transform.TinyTrain(PAPER_STYLE)(mod)["train_step"]
    shapes = {b.var.name: tuple(int(d) for d in b.var.ty.shape) for b in step.body.blocks[0].bindings
              if hasattr(b.var.ty, "shape") and b.var.ty.shape is not None}
    grads = [s for n, s in shapes.items() if n.startswith("conv3_weight") and "adjoint" in n]
    assert grads and all(s[0] == 4 for s in grads)
    assert (16, 16, 1, 1) not in [s for n, s in shapes.items() if "adjoint" in n]


@pytest.mark.parametrize("scheme", ["last-layer", "bias-only", "last-k:2", PAPER_STYLE])
def test_sparse_step_equals_full_gradient_restricted(small, scheme):
    """The pruned, reordered step updates exactly the scheme's parameters (and channels)
    by lr times the full graph's gradient."""
    path, mod, params = small
    lr = 0.05
    x = np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)
    grads = LossAndGrad(path, x, label=3, dtype="float32").grads(params)
    trainer = tt.build(tt.relay.transform.TinyTrain(scheme, optimizer=tt.SGD(lr=lr))(mod), params)
    trainer.step(x, 3)
    trainable = resolve(scheme, tt.layer_table(mod))
    after = trainer.params()
    for name, before in params.items():
        expected = before.copy()
        if name in trainable:
            k = trainable[name] or len(before)
            expected[:k] -= lr * grads[name][:k]
        np.testing.assert_allclose(after[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("optimizer", [tt.SGD(lr=0.05, momentum=0.9), tt.Adam(lr=0.01)])
def test_reordering_keeps_the_numbers(small, optimizer):
    _, mod, params = small
    rng = np.random.default_rng(1)
    samples = [(rng.normal(size=(1, 1, 8, 8)).astype(np.float32), int(rng.integers(10))) for _ in range(3)]
    results = []
    for reorder in (False, True):
        trainer = tt.build(tt.relay.transform.TinyTrain(PAPER_STYLE, optimizer=optimizer,
                                                        reorder=reorder)(mod), params)
        losses = [trainer.step(x, y) for x, y in samples]
        results.append((losses, trainer.params()))
    assert results[0][0] == results[1][0]
    for name in params:
        np.testing.assert_array_equal(results[0][1][name], results[1][1][name])


def test_reordered_updates_follow_their_gradients(small):
    _, mod, _ = small
    for reorder in (True, False):
        step = tt.relay.transform.TinyTrain("full", reorder=reorder)(mod)["train_step"]
        bindings = list(step.body.blocks[0].bindings)
        position = {b.var: i for i, b in enumerate(bindings)}
        trainable = [str(n) for n in step.attrs["tinytrain.trainable"]]
        new_classifier = bindings[-1].value.fields[1 + trainable.index("linear4.weight")]
        first_conv_grad = [i for i, b in enumerate(bindings) if b.var.name == "conv0_weight_adjoint"][0]
        # reordered, the classifier's update runs before the first conv's weight gradient
        assert (position[new_classifier] < first_conv_grad) == reorder


def test_memory_plans_are_sound_and_ordered(small):
    _, mod, _ = small
    reports = {}
    for name, scheme in [("full", "full"), ("paper", PAPER_STYLE), ("last", "last-layer")]:
        report = memory_report(tt.relay.transform.TinyTrain(scheme)(mod))
        report.plan.check_no_overlap()
        assert report.arena_bytes >= max(report.plan.live_bytes_per_step())
        assert report.arena_bytes <= report.tvm_planned_bytes
        reports[name] = report
    assert reports["full"].arena_bytes > reports["paper"].arena_bytes >= reports["last"].arena_bytes
    saved = [reports[k].saved_activations for k in ("full", "paper", "last")]
    assert saved[0] > saved[1] > saved[2]
    assert reports["full"].saved_bytes > reports["paper"].saved_bytes > reports["last"].saved_bytes
    trainable = [reports[k].trainable_bytes for k in ("full", "paper", "last")]
    assert trainable[0] > trainable[1] > trainable[2]
    assert reports["last"].flash_bytes > reports["full"].flash_bytes
    again = memory_report(tt.relay.transform.TinyTrain(PAPER_STYLE)(mod))
    assert again.plan.offsets == reports["paper"].plan.offsets  # deterministic
    unordered = memory_report(tt.relay.transform.TinyTrain("full", reorder=False)(mod))
    unordered.plan.check_no_overlap()
    assert reports["full"].arena_bytes < unordered.arena_bytes


def test_memory_cli_json(small, tmp_path):
    import json
    import subprocess
    import sys

    path, _, _ = small
    png = tmp_path / "m.png"
    out = subprocess.run([sys.executable, "-m", "tvm_tinytrain.cli", "memory", str(path), "--scheme",
                          "last-k:2", "--json", "--plot", str(png)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("arena_bytes", "trainable_bytes", "optimizer_state_bytes", "flash_bytes", "total_sram_bytes"):
        assert isinstance(data[key], int) and data[key] >= 0
    # plain SGD's only state is its learning rate, one float32
    assert data["optimizer_state_bytes"] == 4
    # and the C step's rollback copy: the float updates it writes before its last non-finite check
    assert 0 < data["rollback_bytes"] <= data["trainable_bytes"] + 16 * 4
    persistent = data["trainable_bytes"] + 4 + data["rollback_bytes"]
    assert data["total_sram_bytes"] == data["arena_bytes"] + persistent
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chunked_frozen_bottlenecks_keep_the_numbers_and_save_memory(tmp_path):
    path = tmp_path / "mb.onnx"
    onnx.save(zoo.mobilenet_v2(resolution=32, num_classes=4), path)
    mod, params = tt.load_model(path)
    rng = np.random.default_rng(2)
    samples = [(rng.normal(size=(1, 3, 32, 32)).astype(np.float32), k % 4) for k in range(2)]
    results, arenas = [], []
    for chunk in (None, 1024):
        train_mod = tt.relay.transform.TinyTrain(
            "last-layer", optimizer=tt.SGD(lr=0.05), chunk_bytes=chunk)(mod)
        report = memory_report(train_mod, compare_tvm=False)
        report.plan.check_no_overlap()
        arenas.append(report.arena_bytes)
        trainer = tt.build(train_mod, params)
        results.append(([trainer.step(x, y) for x, y in samples], trainer.params(),
                         trainer.predict(samples[0][0])))
        if chunk:
            calls = _ops(train_mod["predict"], "relax.call_tir_inplace")
            assert len(calls) > 5  # the projections accumulate chunk by chunk
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-4, atol=1e-5)
    for name in params:
        np.testing.assert_allclose(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6)
    assert arenas[1] < arenas[0]

"""The per-kernel profile of the C step on the emulated Cortex-M7 (``qemu_cortex_m7`` with
``profile=1``, ``tvm_tinytrain.micro.profile``): the profile build computes what the plain build
computes, each kernel's slot holds that kernel (the slots sum to the step's cost, the same forward
kernel costs the same in train_step and predict, the families match the model's layers), and a
plain build has no profile code at all."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import require_tools

import tvm_tinytrain as tt
from tvm_tinytrain import micro, zoo
from tvm_tinytrain.errors import InputError
from tvm_tinytrain.micro.profile import hand_kernels, kernel_family, profile_options, read_profile

SCHEME = {"bias": {"last": 3}, "weights": {"3": 1.0}, "classifier": True}
STEPS = 2
TICK = 40  # instructions per SysTick count under -icount shift=0
MARK_MAX = 100  # instructions one profile mark may add (~45 measured)


def _samples(shape):
    rng = np.random.default_rng(0)
    return rng.integers(-128, 128, (STEPS, *shape)).astype(np.int8), rng.integers(0, 10, STEPS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The int8 small CNN as C (int8 classifier; the paper's kind of scheme: the last biases, one
    weight, the classifier): its layers, artifact and folder."""
    require_tools("arm-none-eabi-gcc", "qemu-system-arm", "make")
    root = tmp_path_factory.mktemp("profile")
    onnx.save(zoo.quantize_qdq(zoo.small_cnn(num_classes=10, input_hw=(12, 12), width=8)), root / "m.onnx")
    mod, params = tt.load_model(root / "m.onnx", float_classifier=False)
    train_mod = tt.relay.transform.TinyTrain(SCHEME, optimizer=tt.SGD(lr=0.05))(mod)
    return tt.layer_table(mod), tt.build(train_mod, params, target="c"), root


def _run(artifact, folder, options):
    project = micro.create_project(artifact, "qemu_cortex_m7", folder, options)
    project.build()
    xs, ys = _samples(artifact.metadata["input"]["shape"])
    with project.session() as dev:
        losses, step_costs = [], []
        for x, y in zip(xs, ys):
            losses.append(dev.train_step(x, y))
            step_costs.append(dev.last_cost)
        logits = dev.predict(xs[0])
        return project, np.array(losses, np.float32), step_costs, logits, dev.last_cost, dev.params()


@pytest.fixture(scope="module")
def plain(built):
    _, artifact, root = built
    return _run(artifact, root / "plain", {})


@pytest.fixture(scope="module")
def profiled(built):
    _, artifact, root = built
    run = _run(artifact, root / "profiled", profile_options(artifact))
    return (*run, read_profile(run[0]))


def test_profile_build_computes_what_the_plain_build_computes(plain, profiled):
    _, losses, _, logits, _, params = plain
    _, p_losses, _, p_logits, _, p_params, _ = profiled
    assert p_losses.tobytes() == losses.tobytes()
    assert np.array_equal(p_logits, logits)
    assert params.keys() == p_params.keys()
    for name in params:
        assert params[name].tobytes() == p_params[name].tobytes(), name


def test_kernel_slots_sum_to_the_measured_cost(built, profiled):
    _, artifact, _ = built
    _, _, step_costs, _, predict_cost, _, profile = profiled
    n_step, n_predict = (len(artifact.metadata["plan"][f]) for f in ("train_step", "predict"))
    assert [k.kernel for k in profile.of("train_step")] == list(range(n_step))
    assert [k.kernel for k in profile.of("predict")] == list(range(n_predict))
    assert {k.calls for k in profile.of("train_step")} == {STEPS}
    assert {k.calls for k in profile.of("predict")} == {1}
    # the slots hold everything from the step's first to its last kernel; what follows (the
    # return, the clock read) is a few ticks
    step_slots = sum(k.instructions for k in profile.of("train_step"))
    assert 0 <= sum(step_costs) - step_slots <= STEPS * 4 * TICK
    predict_slots = sum(k.instructions for k in profile.of("predict"))
    assert 0 <= predict_cost - predict_slots <= 4 * TICK
    assert profile.total("predict") == predict_slots


def test_marking_costs_little(built, plain, profiled):
    _, artifact, _ = built
    n_step, n_predict = (len(artifact.metadata["plan"][f]) for f in ("train_step", "predict"))
    extra_step = profiled[2][-1] - plain[2][-1]
    extra_predict = profiled[4] - plain[4]
    assert 0 < extra_step <= n_step * MARK_MAX
    assert 0 < extra_predict <= n_predict * MARK_MAX


def test_a_forward_kernel_costs_the_same_in_the_step_and_in_predict(profiled):
    """The int8 forward kernels are data-independent loops; predict calls the same C functions as the
    step's forward on the same input, so a slot that holds the wrong kernel shows here."""
    profile = profiled[-1]
    in_step = {k.symbol: k.per_call for k in profile.of("train_step")}
    compared = 0
    for k in profile.of("predict"):
        if k.symbol in in_step and k.per_call > 10 * TICK:
            assert abs(k.per_call - in_step[k.symbol]) <= 0.01 * k.per_call + 3 * TICK, k
            compared += 1
    assert compared >= 4  # the four convolutions at least


def test_families_are_the_models_layers(built, profiled):
    """Each conv layer of the model is one kernel of predict, named after the hand-written C it calls
    or, a TVM kernel, after the layer's kind and window; predict is its convolutions."""
    layers, artifact, _ = built
    project, profile = profiled[0], profiled[-1]
    by_weight = {la.weight: la for la in layers if la.kind != "linear"}
    hand = hand_kernels(project.path / "model" / "src")
    seen, conv_instructions = Counter(), 0.0
    for k in profile.of("predict"):
        inputs = artifact.metadata["plan"]["predict"][k.kernel]["inputs"]
        layer = next((by_weight[t] for t in inputs if t in by_weight), None)
        if layer is None:
            continue
        window = f"{layer.weight_shape[2]}x{layer.weight_shape[3]}"
        seen[layer.kind, window] += 1
        conv_instructions += k.per_call
        if k.symbol in hand:
            assert k.family == hand[k.symbol].removeprefix("tinytrain_"), k
        else:
            assert k.family == f"qconv {layer.kind} {window}", k
    expected = Counter((la.kind, f"{la.weight_shape[2]}x{la.weight_shape[3]}") for la in by_weight.values())
    assert seen == expected
    assert conv_instructions > 0.8 * profile.total("predict")
    assert sum(f.share for f in profile.by_family("train_step")) == pytest.approx(1.0)
    table = profile.markdown("train_step", top=3)
    assert "| total | " in table and "other families" in table


def test_a_plain_build_has_no_profile_code(plain, profiled):
    def symbols(project):
        nm = shutil.which("arm-none-eabi-nm")
        return subprocess.run([nm, str(project.binary)], capture_output=True, text=True, check=True).stdout

    assert "tinytrain_profile_kernel" not in symbols(plain[0])
    assert "tinytrain_profile_kernel" in symbols(profiled[0])
    assert not (plain[0].path / "build" / "profile.bin").exists()
    with pytest.raises(InputError, match="no profile"):
        read_profile(plain[0])


def test_a_table_too_small_is_refused(built):
    _, artifact, root = built
    project, *_ = _run(artifact, root / "small_table", {"profile": "1", "profile_slots": "8"})
    with pytest.raises(InputError, match=r"8 slots for \d+ kernels: .*profile_options"):
        read_profile(project)


def test_a_kernel_that_calls_hand_written_c_is_named_after_it(tmp_path):
    (tmp_path / "tinytrain_s8.c").write_text(
        "static inline int32_t tinytrain_lo16(uint32_t v) { return (int16_t)v; }\n"
        "int32_t tinytrain_s8_conv_1x1(const int8_t* x,\n                              int8_t* y) {\n"
        "  return 0;\n}\n")
    (tmp_path / "tinytrain_kernels.c").write_text(
        "void tinytrain_qconv3(int8_t* a0, int8_t* a1) {\n  (void)tinytrain_s8_conv_1x1(a0, a1);\n}\n\n"
        "void tinytrain_qconv_input_grad(float* a0) {\n  a0[0] = 0.0f;\n}\n")
    hand = hand_kernels(tmp_path)
    assert hand["tinytrain_qconv3"] == "tinytrain_s8_conv_1x1"
    assert "tinytrain_qconv_input_grad" not in hand
    shapes = {"conv3.weight": [16, 8, 1, 1], "dwconv4.weight": [16, 1, 3, 3]}
    family = kernel_family("qconv3", hand["tinytrain_qconv3"], ["t1:lv", "conv3.weight"], shapes)
    assert family == "s8_conv_1x1"
    assert kernel_family("qconv_input_grad7", "tinytrain_qconv_input_grad7", ["t9:lv", "dwconv4.weight[:8]"],
                         shapes) == "qconv_input_grad dwconv 3x3"
    assert kernel_family("qconv12", "tinytrain_qconv12", ["t2:lv", "const5"], shapes) == "qconv"

"""The hand-written int8 kernels (codegen/runtime/tinytrain_s8.c) inside the build: the C artifact
ships and calls them, the host path (TVM llvm) calls the same C, the planner lets the depthwise write
its output over its input, and the C step on the host and the emulated Cortex-M7 equals the host
path. The kernels themselves against TVM's are tests/test_s8_kernels.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import require_tools, small_cnn, tiny_int8_mobilenet

import tvm_tinytrain as tt
from tvm_tinytrain import micro
from tvm_tinytrain.codegen import host_library
from tvm_tinytrain.codegen.s8_kernels import HAND_KERNEL, RUNTIME_SOURCES
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.memory_report import memory_report, plan_predict
from tvm_tinytrain.trainer import HostTrainer

# layers (conv, linear) from the input: stem 0, block 1 = 1 2 3, block 2 = 4 5 6, classifier 7. The
# backward stops at layer 6, so block 1's depthwise input (the expansion's output) dies at it in the
# training step too: its output may take that slot.
SCHEME = {"bias": {"last": 2}, "classifier": True}
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(train_mod, params, samples, labels, model file) of the int8 tiny MobileNet; nearest rounding, so TVM's
    float sums and the C's round every int8 update alike."""
    path = tiny_int8_mobilenet(tmp_path_factory.mktemp("tiny"))
    mod, params = tt.load_model(path, float_classifier=False)
    train_mod = tt.relay.transform.TinyTrain(SCHEME, optimizer=tt.SGD(lr=0.05),
                                             integer_rounding="nearest")(mod)
    rng = np.random.default_rng(0)
    xs = rng.integers(-128, 128, (STEPS, 1, 3, 16, 16)).astype(np.int8)
    return train_mod, params, xs, rng.integers(0, 4, STEPS), path


@pytest.fixture(scope="module")
def host_step(tiny):
    """The host path with the hand kernels: logits of the first sample, the losses, the parameters."""
    train_mod, params, xs, ys, _ = tiny
    trainer = HostTrainer(train_mod, params)
    logits = trainer.predict(xs[0])
    losses = np.array([trainer.step(x, y) for x, y in zip(xs, ys)], np.float32)
    return trainer, logits, losses, {n: trainer._values[n].numpy() for n in trainer.trainable}


@pytest.fixture(scope="module")
def artifact(tiny):
    train_mod, params = tiny[:2]
    return tt.build(train_mod, params, target="c")


def _in_place_depthwise(lowered, fn) -> list[str]:
    """The depthwise outputs the plan of ``fn`` put over their input."""
    dw = {o for k in fn.kernels if "tinytrain.inplace_in" in (lowered[k.func].attrs or {}) for o in k.outputs}
    return sorted(o for o in fn.plan.inplace if o in dw)


def test_in_place_depthwise_plans_a_smaller_arena(tiny):
    train_mod = tiny[0]
    plans = {}
    for in_place in (True, False):
        report = memory_report(train_mod, compare_tvm=False, in_place_kernels=in_place)
        plans[in_place] = report, plan_predict(report.lowered, in_place_kernels=in_place)
    (step, predict), (step_apart, predict_apart) = plans[True], plans[False]
    for fn, apart in ((step.step, step_apart.step), (predict, predict_apart)):
        shared = _in_place_depthwise(step.lowered, fn)
        # both blocks' depthwise convs and the global average pool (a depthwise conv too)
        assert len(shared) == 3, f"{fn.name}: depthwise outputs over their inputs: {shared}"
        assert not _in_place_depthwise(step_apart.lowered, apart)
        fn.plan.check_no_overlap()
        live, live_apart = fn.plan.live_bytes_per_step(), apart.plan.live_bytes_per_step()
        producer = {o: k.index for k in fn.kernels for o in k.outputs}
        for out in shared:
            # the same bytes: the C passes one address as the kernel's input and output
            assert fn.plan.offsets[out] == fn.plan.offsets[fn.plan.inplace[out]]
            # and the output takes no bytes of its own while the kernel runs
            assert live_apart[producer[out]] - live[producer[out]] == fn.tensors[out].nbytes
        # block 1's depthwise (32 x 8 x 8 int8 in and out) was the peak
        assert fn.plan.arena_bytes < apart.plan.arena_bytes


@pytest.mark.slow  # TVM's llvm build of its own int8 kernels: ~100 s on a shared 2-core machine
def test_hand_kernels_leave_the_host_step_as_tvm_computes_it(tiny, host_step):
    """The hand kernels compute the int8 forward of TVM's own kernels bit for bit: the same logits,
    then the same losses and integer updates over a few steps."""
    train_mod, params, xs, ys, _ = tiny
    hand, logits, losses, values = host_step
    assert any(HAND_KERNEL in (f.attrs or {}) for f in
               host_library.with_hand_kernels(train_mod).functions.values())
    tvm_kernels = HostTrainer(train_mod, params, hand_kernels=False)
    np.testing.assert_array_equal(tvm_kernels.predict(xs[0]), logits)
    theirs = np.array([tvm_kernels.step(x, y) for x, y in zip(xs, ys)], np.float32)
    np.testing.assert_array_equal(theirs, losses)
    for name, value in values.items():
        np.testing.assert_array_equal(tvm_kernels._values[name].numpy(), value, err_msg=name)


def test_the_artifact_ships_the_hand_kernels_only_when_it_calls_them(artifact, tmp_path):
    for name in RUNTIME_SOURCES:
        assert f"src/{name}" in artifact.files
    assert "tinytrain_s8_depthwise(" in artifact.files["src/tinytrain_kernels.c"]
    onnx.save(small_cnn(), tmp_path / "float.onnx")
    mod, params = tt.load_model(tmp_path / "float.onnx")
    float_artifact = tt.build(tt.relay.transform.TinyTrain("last-layer")(mod), params, target="c")
    assert not any(f"src/{name}" in float_artifact.files for name in RUNTIME_SOURCES)


def _run(project, xs, ys):
    with project.session() as dev:
        logits = dev.predict(xs[0])
        predict_cost = dev.last_cost
        losses = np.array([dev.train_step(x, y) for x, y in zip(xs, ys)], np.float32)
        return logits, losses, dev.params(), dev.last_cost, predict_cost


@pytest.fixture(scope="module")
def host_c(tiny, artifact, tmp_path_factory):
    require_tools("gcc", "make")
    # AddressSanitizer + UBSan: a kernel writing past its output or scratch aborts the run
    project = micro.create_project(artifact, "host", tmp_path_factory.mktemp("host") / "p", {"sanitize": 1})
    project.build()
    return _run(project, *tiny[2:4])


def test_c_step_with_in_place_depthwise_equals_the_host_path(tiny, artifact, host_step, host_c):
    train_mod = tiny[0]
    report = memory_report(train_mod, compare_tvm=False)
    assert len(_in_place_depthwise(report.lowered, report.step)) == 3  # what the artifact was planned with
    _, logits, losses, values = host_step
    c_logits, c_losses, c_params, _, _ = host_c
    # the same int8 forward (the same C on both sides); the dequantized logits round alike to 1 ulp
    np.testing.assert_allclose(c_logits, logits, rtol=1e-6, atol=0)
    np.testing.assert_allclose(c_losses, losses, rtol=1e-5, atol=1e-6)
    for name, value in values.items():
        if value.dtype == np.float32:
            np.testing.assert_allclose(c_params[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        else:  # int8 weights, int32 biases
            np.testing.assert_array_equal(c_params[name], value, err_msg=name)


def test_qemu_step_equals_host_c_in_deterministic_instructions(tiny, artifact, host_c, tmp_path):
    require_tools("arm-none-eabi-gcc", "qemu-system-arm", "make")
    project = micro.create_project(artifact, "qemu_cortex_m7", tmp_path / "qemu", {})
    project.build()
    logits, losses, params, step_cost, predict_cost = _run(project, *tiny[2:4])
    np.testing.assert_array_equal(logits, host_c[0])
    np.testing.assert_array_equal(losses, host_c[1])
    for name, value in params.items():
        np.testing.assert_array_equal(value, host_c[2][name], err_msg=name)
    # Exact figures, so that a slower kernel or a lost compiler flag shows here. The count is exact
    # under -icount shift=0; the SysTick that reads it ticks every 40 instructions, from a phase that
    # depends on how long the device waited for the host's bytes: one tick either way. The figures
    # move with any change to the kernels, the lowering or the template's flags (arm-none-eabi-gcc
    # 12.2, -O2 -funroll-loops): when a change is meant, run this test and paste the new figures from
    # its message, saying in the commit what moved them.
    measured = {"train_step": step_cost, "predict": predict_cost}
    assert all(abs(measured[f] - n) <= SYSTICK for f, n in EXPECTED_INSTRUCTIONS.items()), \
        f"instructions: {measured}, expected {EXPECTED_INSTRUCTIONS} (one SysTick either way)"


SYSTICK = 40  # instructions per SysTick tick on mps2-an500 under -icount shift=0
EXPECTED_INSTRUCTIONS = {"train_step": 310800, "predict": 305280}  # see the test above


def test_host_kernels_are_built_once_per_source(tmp_path, monkeypatch):
    """The host library lives in the cache under a name keyed by the sources; a second load in a
    fresh process finds it and compiles nothing."""
    monkeypatch.setenv("TINYTRAIN_CACHE", str(tmp_path))
    code = ("from tvm_tinytrain.codegen import host_library as h; p = h.load_host_kernels(); "
            "print(p, p.stat().st_mtime_ns)")
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env={**os.environ, "TINYTRAIN_CACHE": str(tmp_path)}).stdout.split()
                     for _ in range(2))
    assert first == second and Path(first[0]).parent == tmp_path / "host-kernels"
    assert [p.name for p in (tmp_path / "host-kernels").iterdir()] == [Path(first[0]).name]


def test_no_c_compiler_is_one_line_naming_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYTRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, no gcc
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(TinyTrainError, match=r"no C compiler found .*set CC") as err:
        host_library.load_host_kernels()
    assert "\n" not in str(err.value)


def test_a_library_exported_with_hand_kernels_loads_in_a_fresh_process(tiny, host_step, tmp_path):
    """A search worker gets the compiled step as bytes and loads it in its own process: the kernels'
    symbols must be there before the library is (``HostTrainer(library=...)``)."""
    xs, path = tiny[2], tiny[4]
    trainer, logits = host_step[:2]
    trainer.export_library(tmp_path / "step.so")
    np.save(tmp_path / "x.npy", xs[0])
    script = (
        "import json, sys, numpy as np\n"
        "import tvm_tinytrain as tt\n"
        "from tvm_tinytrain.trainer import HostTrainer\n"
        "folder, scheme = sys.argv[1], json.loads(sys.argv[3])\n"
        "mod, params = tt.load_model(sys.argv[2], float_classifier=False)\n"
        "train_mod = tt.relay.transform.TinyTrain(scheme, optimizer=tt.SGD(lr=0.05), "
        "integer_rounding='nearest')(mod)\n"
        "t = HostTrainer(train_mod, params, library=folder + '/step.so')\n"
        "np.save(folder + '/out.npy', t.predict(np.load(folder + '/x.npy')))\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(path), json.dumps(SCHEME)], check=True,
                   capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), logits)

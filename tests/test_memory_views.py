"""Views: a kernel that only copies a contiguous run of its input (a split along the outermost
non-unit axis, a slice of leading rows, a reshape) is planned as bytes of that input and not called.
The planner places and checks views; ``contiguous_slices`` finds such kernels in the TIR; a tiny int8
MobileNet whose step splits gradients for partial weight updates plans a smaller arena with them,
and its C step (host and Cortex-M7) computes bit for bit what it computes without them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_tools, tiny_int8_mobilenet
from tvm.script import tirx as T

import tvm_tinytrain as tt
from tvm_tinytrain import micro
from tvm_tinytrain.codegen.build import build_c
from tvm_tinytrain.contiguous_slices import contiguous_slices
from tvm_tinytrain.memory import Buffer, MemoryPlan, lower_bound, plan_memory
from tvm_tinytrain.memory_report import memory_report, plan_predict

# ----- the planner ---------------------------------------------------------------------------------


def _split_buffers() -> list[Buffer]:
    """``g`` (64 B, made at 0) split at 1 into halves read until 2 and 3; ``o`` made at 2."""
    return [Buffer("g", 64, 0, 3, "gradient"),
            Buffer("lo", 32, 1, 2, "gradient", view_of="g"),
            Buffer("hi", 32, 1, 3, "gradient", view_of="g", view_offset=32),
            Buffer("o", 48, 2, 3, "gradient")]


def test_views_lie_in_their_parent_and_take_no_bytes():
    plan = plan_memory(_split_buffers(), alignment=16)
    plan.check_no_overlap()
    assert plan.views == {"lo": "g", "hi": "g"}
    assert plan.offsets["lo"] == plan.offsets["g"] and plan.offsets["hi"] == plan.offsets["g"] + 32
    assert plan.arena_bytes == 112  # g and o; copies of the halves would need 64 more at step 1
    assert plan.live_bytes_per_step() == [64, 64, 112, 112]
    assert lower_bound(_split_buffers()) == 112
    assert [b.name for b in plan.alive_at(2)] == ["g", "o"]


def test_views_of_views_add_their_offsets():
    buffers = [Buffer("pad", 16, 0, 1, "activation"), Buffer("x", 96, 1, 4, "activation"),
               Buffer("rows", 64, 2, 4, "activation", view_of="x", view_offset=32),
               Buffer("row", 16, 3, 4, "activation", view_of="rows", view_offset=48)]
    plan = plan_memory(buffers, alignment=16)
    plan.check_no_overlap()
    assert plan.offsets["row"] == plan.offsets["x"] + 80


def test_no_one_writes_over_a_view_or_over_a_parent_a_view_still_reads():
    buffers = _split_buffers() + [
        Buffer("over_lo", 32, 2, 3, "gradient", reuse_of="lo"),  # a view: never
        Buffer("over_g", 64, 3, 3, "gradient", reuse_of="g"),  # hi is still read at 3
    ]
    plan = plan_memory(buffers, alignment=16)
    plan.check_no_overlap()
    assert plan.inplace == {}
    # once every view is dead, the parent may be taken over as before
    done = [Buffer("x", 64, 0, 3, "activation"), Buffer("v", 32, 1, 2, "activation", view_of="x"),
            Buffer("y", 64, 3, 4, "activation", reuse_of="x")]
    assert plan_memory(done).inplace == {"y": "x"}


def test_check_no_overlap_tells_a_view_from_a_clash():
    buffers = _split_buffers()
    good = plan_memory(buffers, alignment=16)
    moved = dict(good.offsets, hi=good.offsets["g"] + 16)  # hi now overlaps lo
    with pytest.raises(AssertionError, match="'lo'.*'hi'|'hi'.*'lo'"):
        MemoryPlan(moved, good.arena_bytes, buffers, 16, {}, good.views).check_no_overlap()
    outside = dict(good.offsets, hi=good.offsets["o"])  # not inside g any more
    with pytest.raises(AssertionError, match="view 'hi' does not lie inside 'g'"):
        MemoryPlan(outside, good.arena_bytes, buffers, 16, {}, good.views).check_no_overlap()
    # the same offsets without the view relation are an overlap
    plain = [Buffer(b.name, b.size, b.first, b.last, b.kind) for b in buffers]
    with pytest.raises(AssertionError, match="overlap"):
        MemoryPlan(good.offsets, good.arena_bytes, plain, 16).check_no_overlap()


@pytest.mark.parametrize("view, message", [
    (Buffer("v", 32, 1, 2, "gradient", view_of="nope"), "not a buffer"),
    (Buffer("v", 32, 1, 2, "gradient", view_of="g", view_offset=48), "does not lie inside"),
    (Buffer("v", 16, 1, 2, "gradient", view_of="g", view_offset=8), "multiple of 16"),
    (Buffer("v", 32, 1, 5, "gradient", view_of="g"), "outlives"),
    (Buffer("v", 32, 1, 2, "gradient", reuse_of="g", view_of="g"), "in place"),
])
def test_bad_views_rejected(view, message):
    with pytest.raises(ValueError, match=message):
        plan_memory([Buffer("g", 64, 0, 3, "gradient"), view], alignment=16)


def test_view_cycles_rejected():
    with pytest.raises(ValueError, match="view of itself"):
        plan_memory([Buffer("a", 16, 0, 1, "scratch", view_of="b"),
                     Buffer("b", 16, 0, 1, "scratch", view_of="a")])


# ----- finding the kernels -------------------------------------------------------------------------


@T.prim_func(private=True, s_tir=True)
def split_channels(x: T.Buffer((1, 6, 2, 2), "float32"), a: T.Buffer((1, 2, 2, 2), "float32"),
                   b: T.Buffer((1, 4, 2, 2), "float32")):
    for i0, i1, i2, i3 in T.grid(1, 2, 2, 2):
        with T.sblock("a"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
            a[v0, v1, v2, v3] = x[v0, v1, v2, v3]
    for i0, i1, i2, i3 in T.grid(1, 4, 2, 2):
        with T.sblock("b"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
            b[v0, v1, v2, v3] = x[v0, v1 + 2, v2, v3]


@T.prim_func(private=True, s_tir=True)
def rows_of_channels(x: T.Buffer((1, 2, 4, 4), "int8"), y: T.Buffer((1, 2, 2, 4), "int8")):
    for i0, i1, i2, i3 in T.grid(1, 2, 2, 4):
        with T.sblock("y"):
            v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
            y[v0, v1, v2, v3] = x[v0, v1, v2 + 2, v3]


@T.prim_func(private=True, s_tir=True)
def every_other(x: T.Buffer((8,), "int32"), y: T.Buffer((4,), "int32")):
    for i in range(4):
        with T.sblock("y"):
            v = T.axis.spatial(4, i)
            y[v] = x[v * 2]


@T.prim_func(private=True, s_tir=True)
def flatten(x: T.Buffer((1, 3, 1, 1), "int8"), y: T.Buffer((1, 3), "int8")):
    for i0, i1 in T.grid(1, 3):
        with T.sblock("y"):
            v0, v1 = T.axis.remap("SS", [i0, i1])
            y[v0, v1] = x[0, v1 % 3, 0, 0]


@T.prim_func(private=True, s_tir=True)
def cast_tail(x: T.Buffer((8,), "int8"), y: T.Buffer((4,), "int32")):
    for i in range(4):
        with T.sblock("y"):
            v = T.axis.spatial(4, i)
            y[v] = T.Cast("int32", x[v + 4])


@T.prim_func(private=True, s_tir=True)
def partial_tail(x: T.Buffer((8,), "int32"), y: T.Buffer((4,), "int32")):
    for i in range(3):  # leaves y[3] unwritten
        with T.sblock("y"):
            v = T.axis.spatial(4, i)
            y[v] = x[v + 4]


def test_contiguous_slices_found_from_the_tir():
    assert contiguous_slices(split_channels, 1) == {0: (0, 0), 1: (0, 2 * 2 * 2 * 4)}
    assert contiguous_slices(flatten, 1) == {0: (0, 0)}
    # rows of every channel are not one run; nor are strided, cast or partly written outputs
    for func in (rows_of_channels, every_other, cast_tail, partial_tail):
        assert contiguous_slices(func, 1) is None, func


# ----- a training step -----------------------------------------------------------------------------

# layers: stem 0, block 1 = 1 2 3, block 2 = 4 5 6, classifier 7. Layers 4 and 6 update half and a
# quarter of their output channels: the step splits their inputs' and output gradients' channels.
SCHEME = {"bias": {"last": 4}, "weights": {"4": 0.5, "6": 0.25}, "classifier": True}
STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_int8_mobilenet(tmp_path_factory.mktemp("views"))
    mod, params = tt.load_model(path, float_classifier=False)
    train_mod = tt.relay.transform.TinyTrain(SCHEME, optimizer=tt.SGD(lr=0.05),
                                             integer_rounding="nearest")(mod)
    rng = np.random.default_rng(0)
    return train_mod, params, rng.integers(-128, 128, (STEPS, 1, 3, 16, 16)).astype(np.int8), \
        rng.integers(0, 4, STEPS)


@pytest.fixture(scope="module")
def reports(tiny):
    return {views: memory_report(tiny[0], compare_tvm=False, views=views) for views in (True, False)}


def test_split_gradients_are_views_and_the_arena_shrinks(reports):
    with_views, apart = reports[True], reports[False]
    step = with_views.step
    splits = [k for k in step.kernels if k.func.startswith("split")]
    assert len(splits) == 2 and all(len(k.outputs) == 2 for k in splits)
    for k in splits:  # both halves of the gradient, at its start and half-way in
        (parent,) = k.inputs
        assert [step.plan.views.get(o) for o in k.outputs] == [parent, parent]
        half = step.tensors[k.outputs[0]].nbytes
        assert [step.plan.offsets[o] - step.plan.offsets[parent] for o in k.outputs] == [0, half]
    assert not apart.step.plan.views
    # the peak was block 2's expansion gradient (8 KB float) next to its two 4 KB halves
    assert (with_views.arena_bytes, apart.arena_bytes) == (13136, 17168)
    assert with_views.total_sram_bytes == apart.total_sram_bytes - 4032


def _run(project, xs, ys):
    with project.session() as dev:
        logits = dev.predict(xs[0])
        losses = np.array([dev.train_step(x, y) for x, y in zip(xs, ys)], np.float32)
        return logits, losses, dev.params()


@pytest.fixture(scope="module")
def artifacts(tiny):
    return {views: build_c(tiny[0], tiny[1], views=views) for views in (True, False)}


@pytest.fixture(scope="module")
def host_runs(tiny, artifacts, tmp_path_factory):
    require_tools("gcc", "make")
    runs = {}
    for views, artifact in artifacts.items():
        folder = tmp_path_factory.mktemp(f"host_views_{views}") / "p"
        project = micro.create_project(artifact, "host", folder, {"sanitize": 1})
        project.build()
        runs[views] = _run(project, *tiny[2:4])
    return runs


def _assert_same(run, reference):
    np.testing.assert_array_equal(run[0], reference[0])
    np.testing.assert_array_equal(run[1], reference[1])
    assert run[2].keys() == reference[2].keys()
    for name, value in run[2].items():
        np.testing.assert_array_equal(value, reference[2][name], err_msg=name)


def test_the_c_step_calls_no_kernel_for_a_view(artifacts):
    model_c = artifacts[True].files["src/tinytrain_model.c"]
    assert model_c.count("(views of the input: nothing to copy)") >= 2
    assert "(views of the input" not in artifacts[False].files["src/tinytrain_model.c"]


def test_host_c_step_with_views_equals_the_step_without(host_runs):
    _assert_same(host_runs[True], host_runs[False])


@pytest.mark.slow  # a Cortex-M7 build and run: ~60-90 s on the shared machine
def test_qemu_step_with_views_equals_host_c(tiny, artifacts, host_runs, tmp_path):
    require_tools("arm-none-eabi-gcc", "qemu-system-arm", "make")
    project = micro.create_project(artifacts[True], "qemu_cortex_m7", tmp_path / "qemu", {})
    project.build()
    _assert_same(_run(project, *tiny[2:4]), host_runs[True])


def test_predict_plans_views_too(reports):
    predict = plan_predict(reports[True].lowered)
    predict.plan.check_no_overlap()
    assert predict.plan.views  # the forward's channel slices and the pooled output's reshape

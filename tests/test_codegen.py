"""The C path: generated C vs TVM's host build, host C vs QEMU, sanitizers, SRAM, budget."""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest
from conftest import require_tools

import tvm_tinytrain as tt
from tvm_tinytrain import micro, zoo
from tvm_tinytrain.codegen import Artifact, BudgetError
from tvm_tinytrain.errors import InputError

ARM = ["-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-sp-d16", "-mfloat-abi=hard"]
STRICT = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-O2"]
def _small():
    return zoo.small_cnn(num_classes=5, input_hw=(8, 8), width=4, seed=1)


def _mobilenet():
    return zoo.mobilenet_v2(resolution=32, num_classes=5)


CONFIGS = {
    # partial weights (a 1x1 conv's first half of channels), SGD with momentum
    "sparse-momentum": (_small, {"bias": {"last": 4}, "weights": {"3": 0.5, "4": 1.0}},
                        tt.SGD(lr=0.05, momentum=0.9), None),
    "full-adam": (_small, "full", tt.Adam(lr=0.01), None),
    # frozen inverted bottlenecks run in channel chunks, accumulated in place (call_tir_inplace)
    "mobilenet-chunked": (_mobilenet, "last-layer", tt.SGD(lr=0.05), 1024),
}
STEPS = 8
SHAPES = {"sparse-momentum": (1, 1, 8, 8), "full-adam": (1, 1, 8, 8), "mobilenet-chunked": (1, 3, 32, 32)}
QEMU = {"mobilenet-chunked": {"flash_kb": 2048}}  # 1 MB of float32 weights: more than the F746 holds
_current = {"shape": (1, 1, 8, 8), "qemu": {}}


def _samples(n=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *_current["shape"])).astype("float32"), rng.integers(0, 5, n)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    """(artifact, TVM host trainer after STEPS steps and its losses, a working folder)."""
    build_model, scheme, optimizer, chunk_bytes = CONFIGS[request.param]
    _current["shape"], _current["qemu"] = SHAPES[request.param], QEMU.get(request.param, {})
    root = tmp_path_factory.mktemp(request.param)
    onnx.save(build_model(), root / "m.onnx")
    mod, params = tt.load_model(root / "m.onnx")
    kwargs = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
    train_mod = tt.relay.transform.TinyTrain(scheme, optimizer=optimizer, **kwargs)(mod)
    _current["train_mod"], _current["params"] = train_mod, params
    artifact = tt.build(train_mod, params, target="c")
    if chunk_bytes:
        assert "accumulate" in artifact.files["src/tinytrain_kernels.c"]
    ref = tt.build(train_mod, params)
    xs, ys = _samples()
    losses = [ref.step(x, y) for x, y in zip(xs, ys)]
    return artifact, ref, losses, root


def _run(project: micro.Project):
    """STEPS steps on the device: (losses, parameters, logits of the first sample, session)."""
    xs, ys = _samples()
    with project.session() as dev:
        losses = [dev.train_step(x, y) for x, y in zip(xs, ys)]
        return np.array(losses, np.float32), dev.params(), dev.predict(xs[0]), dev


def _ref_params(ref, names):
    return {n: ref._values[n].numpy() for n in names}


def test_c_compiles_warning_free_on_host_and_cortex_m7(case):
    require_tools("gcc", "arm-none-eabi-gcc")
    artifact, _, _, root = case
    out = artifact.export(root / "artifact")
    sources = sorted(str(p) for p in (out / "src").glob("*.c"))
    defined, undefined = set(), set()
    for cc, extra in (("gcc", []), ("arm-none-eabi-gcc", ARM)):
        for i, src in enumerate(sources):
            obj = root / f"{cc}{i}.o"
            includes = ["-I", str(out / "include"), "-I", str(out / "src")]
            subprocess.run([cc, *extra, *STRICT, *includes, "-c", src,
                            "-o", str(obj)], check=True, capture_output=True)
            if cc == "gcc":
                nm = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
                for line in nm.splitlines():
                    kind, name = line.split()[-2:]
                    (undefined if kind == "U" else defined if kind.isupper() else set()).add(name)
    # one prefix for every exported symbol; nothing from a runtime library but the C library's copies
    # and sqrtf (Adam), which IEEE 754 makes correctly rounded on every target
    assert all(name.startswith("tinytrain_") for name in defined), sorted(defined)
    assert undefined - defined <= {"memcpy", "memmove", "memset", "sqrtf"}, sorted(undefined - defined)
    model_c = (out / "src" / "tinytrain_model.c").read_text()
    assert model_c.count("static _Alignas(16) uint8_t tinytrain_arena[TINYTRAIN_ARENA_BYTES]") == 1
    assert f"#define TINYTRAIN_ARENA_BYTES {artifact.metadata['memory']['arena_bytes']}u" in \
        (out / "include" / "tinytrain_model.h").read_text()
    assert "const float tinytrain_flash_" in (out / "src" / "tinytrain_params.c").read_text()


def test_host_c_matches_the_tvm_host_path(case):
    require_tools("gcc", "make")
    artifact, ref, ref_losses, root = case
    project = micro.create_project(artifact, "host", root / "host")
    project.build()
    losses, params, logits, dev = _run(project)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    expected = _ref_params(ref, params)
    for name, value in params.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(logits, ref.predict(_samples()[0][0]), rtol=1e-4, atol=1e-6)
    assert dev.last_cost > 0 and dev.cost_unit == "ns"
    assert dev.returncode == 0


def test_host_c_learning_rate_schedule_matches_the_tvm_host_path(case):
    """A cosine schedule set between steps (``tinytrain_set_learning_rate`` through the
    protocol's 'L') trains as the TVM host trainer does with the same rates."""
    require_tools("gcc", "make")
    artifact, _, _, root = case
    ref = tt.build(_current["train_mod"], _current["params"])
    base = ref.learning_rate
    rates = [0.5 * base * (1 + np.cos(np.pi * t / STEPS)) for t in range(STEPS)]
    xs, ys = _samples(seed=1)
    ref_losses = []
    for lr, x, y in zip(rates, xs, ys):
        ref.learning_rate = lr
        ref_losses.append(ref.step(x, y))
    project = micro.create_project(artifact, "host", root / "host-lr")
    project.build()
    with project.session() as dev:
        assert dev.learning_rate == pytest.approx(base)
        losses = []
        for lr, x, y in zip(rates, xs, ys):
            dev.learning_rate = lr
            losses.append(dev.train_step(x, y))
        assert dev.learning_rate == pytest.approx(rates[-1])
        params = dev.params()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    expected = _ref_params(ref, params)
    for name, value in params.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_qemu_equals_host_c_bit_for_bit(case):
    require_tools("gcc", "make", "arm-none-eabi-gcc", "qemu-system-arm")
    artifact, _, _, root = case
    host = micro.create_project(artifact, "host", root / "host2")
    host.build()
    qemu = micro.create_project(artifact, "qemu_cortex_m7", root / "qemu", _current["qemu"])
    qemu.build()
    h_losses, h_params, h_logits, _ = _run(host)
    q_losses, q_params, q_logits, dev = _run(qemu)
    assert h_losses.tobytes() == q_losses.tobytes()
    assert h_logits.tobytes() == q_logits.tobytes()
    for name in h_params:
        assert h_params[name].tobytes() == q_params[name].tobytes(), name
    assert dev.cost_unit == "instructions" and dev.last_cost > 1000
    assert dev.returncode == 0


def test_host_build_runs_clean_under_address_and_undefined_sanitizers(case):
    require_tools("gcc", "make")
    artifact, _, ref_losses, root = case
    project = micro.create_project(artifact, "host", root / "asan", {"sanitize": 1})
    project.build()
    xs, ys = _samples()
    with project.session() as dev:
        losses = [dev.train_step(x, y) for x, y in zip(xs, ys)]
        dev.predict(xs[0])
        dev.set_params(dev.params())
        dev.reset()
        stderr_owner = dev
    assert stderr_owner.returncode == 0
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)


def test_qemu_measured_sram_is_the_plan_plus_a_small_runtime(case):
    require_tools("make", "arm-none-eabi-gcc", "qemu-system-arm")
    artifact, _, _, root = case
    project = micro.create_project(artifact, "qemu_cortex_m7", root / "qemu_sram", _current["qemu"])
    project.build()
    static = project.static_ram()
    mem = artifact.metadata["memory"]
    assert static["arena"] == mem["arena_bytes"]  # the linker's arena is the planner's, to the byte
    block = artifact.metadata["trainable"] + artifact.metadata["optimizer_state"]
    assert static["params"] == max(16, max(s["offset"] + -(-s["bytes"] // 16) * 16 for s in block))
    xs, ys = _samples(2)
    with project.session() as dev:
        for x, y in zip(xs, ys):
            dev.train_step(x, y)
        used, reserved = dev.stack()
    measured = static["data"] + static["bss"] + used
    planned = mem["planned_sram_bytes"]
    assert 0 < used < reserved
    assert planned <= measured <= planned + 4096, (planned, measured, static, used)


def test_a_build_over_the_ram_region_fails_at_link_time(case, tmp_path):
    require_tools("make", "arm-none-eabi-gcc")
    artifact, _, _, _ = case
    ram_kb = artifact.metadata["memory"]["planned_sram_bytes"] // 1024  # less than the plan needs
    options = {**_current["qemu"], "ram_kb": ram_kb, "stack_kb": 1}
    project = micro.create_project(artifact, "qemu_cortex_m7", tmp_path / "tiny", options)
    with pytest.raises(tt.TinyTrainError, match="region .RAM. overflowed"):
        project.build()


def test_budget_refuses_before_any_c_is_generated(case, monkeypatch):
    artifact, _, _, _ = case
    from tvm_tinytrain.codegen import build as build_module

    def no_c(*args, **kwargs):
        raise AssertionError("C was generated for a build over budget")

    need = artifact.metadata["memory"]["planned_sram_bytes"]
    train_mod, params = _current["train_mod"], _current["params"]
    monkeypatch.setattr(build_module, "kernels_c", no_c)
    with pytest.raises(BudgetError) as err:
        tt.build(train_mod, params, target="c", budget=need - 1)
    text = str(err.value)
    assert f"needs {need / 1024:,.1f} KB" in text and "budget is" in text
    assert "rest of the arena" in text or "(gradient)" in text or "(activation)" in text  # the arena's parts
    monkeypatch.undo()
    fits = tt.build(train_mod, params, target="c", budget=need)  # exactly the plan: accepted
    assert fits.metadata["memory"]["budget_bytes"] == need


@pytest.mark.parametrize("text, expected", [("256KB", 262144), ("320 KiB", 327680), ("1MB", 1048576),
                                            (4096, 4096)])
def test_budget_sizes_parse(text, expected):
    from tvm_tinytrain.codegen import parse_budget

    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-3KB", "12 parsecs", 0])
def test_bad_budget_is_an_input_error(bad):
    from tvm_tinytrain.codegen import parse_budget

    with pytest.raises(InputError, match="budget"):
        parse_budget(bad)


def test_export_as_tar_loads_back_and_makes_a_project(case, tmp_path):
    artifact, _, _, _ = case
    path = artifact.export(tmp_path / "model.tar")
    loaded = Artifact.load(path)
    assert loaded.files == artifact.files and loaded.metadata == artifact.metadata
    meta = loaded.metadata
    assert meta["versions"]["tvm"].startswith("0.27") and meta["input"]["shape"] == list(_current["shape"])
    assert set(meta["plan"]) == {"train_step", "predict"}
    project = micro.create_project(path, "host", tmp_path / "p")
    assert (project.path / "model" / "include" / "tinytrain_model.h").is_file()


def test_missing_toolchain_names_what_to_install(case, tmp_path, monkeypatch):
    artifact, _, _, _ = case
    project = micro.create_project(artifact, "qemu_cortex_m7", tmp_path / "q")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(micro.ToolMissingError, match="apt-get install gcc-arm-none-eabi"):
        project.build()


def test_unknown_template_and_option_are_input_errors(case, tmp_path):
    artifact, _, _, _ = case
    with pytest.raises(InputError, match="unknown template 'arduino'"):
        micro.create_project(artifact, "arduino", tmp_path / "a")
    with pytest.raises(InputError, match="no option"):
        micro.create_project(artifact, "host", tmp_path / "b", {"ram_kb": 4})


def test_device_rejects_a_bad_label_before_sending(case, tmp_path):
    require_tools("gcc", "make")
    artifact, _, _, _ = case
    project = micro.create_project(artifact, "host", tmp_path / "h")
    project.build()
    with project.session() as dev:
        with pytest.raises(InputError, match="class index"):
            dev.train_step(np.zeros(_current["shape"], np.float32), 7)
        with pytest.raises(InputError, match="shape"):
            dev.predict(np.zeros((3, 3), np.float32))

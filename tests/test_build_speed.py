"""What makes the C and llvm builds fast changes nothing in what they compute: a large integer value of
loads (the int8 requantization) set aside while TVM's passes run comes back as the passes would have
left it."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from conftest import tiny_int8_mobilenet
from tvm import te, tirx

import tvm_tinytrain as tt
from relay_passes import int8_arith
from tvm_tinytrain.codegen import kernels, set_aside
from tvm_tinytrain.codegen.set_aside import PLACEHOLDER, SetAside
from tvm_tinytrain.lower import lower
from tvm_tinytrain.trainer import HostTrainer


@pytest.fixture(scope="module")
def tiny_kernels(tmp_path_factory):
    """One PrimFunc of each kernel family of a tiny int8 MobileNet's training step, with TVM's own
    int8 forward kernels (no hand-written C): requantizing convs and adds, masks, backward, updates."""
    path = tiny_int8_mobilenet(tmp_path_factory.mktemp("tiny"))
    mod, _ = tt.load_model(path, float_classifier=False)
    scheme = {"bias": {"last": 4}, "weights": {"5": 0.5}, "classifier": True}
    lowered = lower(tt.relay.transform.TinyTrain(scheme, optimizer=tt.SGD(lr=0.05))(mod), hand_kernels=False)
    one_each = {}
    for gv, func in lowered.functions.items():
        if isinstance(func, tirx.PrimFunc):
            one_each.setdefault(re.sub(r"\d+$", "", gv.name_hint), (f"tinytrain_{gv.name_hint}", func))
    return dict(one_each.values())


def _aside_values(func: tirx.PrimFunc) -> int:
    aside = SetAside()
    aside.set_aside(func)
    return len(aside.values)


def test_set_aside_leaves_the_c_unchanged(tiny_kernels, monkeypatch):
    families = {name.rstrip("0123456789") for name in tiny_kernels}
    assert {"tinytrain_qconv", "tinytrain_qadd", "tinytrain_pack_clamp_mask", "tinytrain_integer_update"} \
        <= families
    # the requantizing kernels' values are set aside
    assert _aside_values(tiny_kernels["tinytrain_qconv"]) == 1
    assert _aside_values(tiny_kernels["tinytrain_qadd"]) >= 1
    fast = kernels.kernels_c(tiny_kernels, "tinytrain")
    monkeypatch.setattr(kernels, "SetAside", lambda: SetAside(min_nodes=10**9))  # nothing set aside
    assert kernels.kernels_c(tiny_kernels, "tinytrain") == fast


def test_put_back_restores_what_was_set_aside(tiny_kernels):
    func = tiny_kernels["tinytrain_qconv"]
    aside = SetAside()
    hidden = aside.set_aside(func)
    text = hidden.script()
    assert f"{PLACEHOLDER}0" in text and "T.Div" not in text  # the requantization is out of sight
    assert "T.Div" in func.script()
    tvm.ir.assert_structural_equal(aside.put_back(hidden), func)


def _func(value) -> tirx.PrimFunc:
    """y[i] = value(i, acc[i], b[i], m[i], s[i]) over 16 elements."""
    acc, b, m, s = (te.placeholder((16,), "int32", name=n) for n in ("acc", "b", "m", "s"))
    y = te.compute((16,), lambda i: value(i, acc[i], b[i], m[i], s[i]), name="y")
    return te.create_prim_func([acc, b, m, s, y])


def _requantize(acc, b, m, s):
    return int8_arith.multiply_by_quantized_multiplier(int8_arith.saturating_bias_add(acc, b, s), m, s)


def test_only_large_integer_values_of_loads_are_set_aside():
    assert _aside_values(_func(lambda i, acc, b, m, s: _requantize(acc, b, m, s))) == 1
    # it reads the loop variable: a loop's range may simplify it
    assert _aside_values(_func(lambda i, acc, b, m, s: _requantize(acc + i, b, m, s))) == 0
    # float arithmetic: LowerIntrin may fuse a multiply-add
    assert _aside_values(_func(lambda i, acc, b, m, s: tirx.Cast("int32", tirx.Cast(
        "float32", _requantize(acc, b, m, s)) * tirx.const(0.5, "float32")))) == 0
    # a small value costs the passes nothing
    assert _aside_values(_func(lambda i, acc, b, m, s: acc * m + b)) == 0


def _numpy_requantize(acc, bias, mult, shift):
    """TFLite's MultiplyByQuantizedMultiplier of the saturated acc + bias, in Python integers."""
    out = []
    for a, b, m, s in zip(*(v.tolist() for v in (acc, bias, mult, shift))):
        limit = (2**31 - 1) >> max(s, 0)
        ab = max(min(a + b, limit), -limit - 1) * (1 << max(s, 0)) * m
        n = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
        high = abs(n) // (1 << 31) * (1 if n >= 0 else -1)  # C's truncating division
        mask = (1 << max(-s, 0)) - 1
        threshold = (mask >> 1) + (1 if high < 0 else 0)
        out.append((high >> max(-s, 0)) + (1 if high & mask > threshold else 0))
    return np.array(out, np.int32)


def test_a_set_aside_value_computes_tflite_requantization(tmp_path):
    """The requantization through the set-aside path, compiled by gcc, equals TFLite's arithmetic."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    source = kernels.kernels_c({"tinytrain_requantize": _func(
        lambda i, acc, b, m, s: _requantize(acc, b, m, s))}, "tinytrain")
    assert PLACEHOLDER not in source
    rng = np.random.default_rng(0)
    values = {"acc": rng.integers(-(1 << 20), 1 << 20, 16), "bias": rng.integers(-(1 << 16), 1 << 16, 16),
              "mult": rng.integers(1 << 30, (1 << 31) - 1, 16), "shift": rng.integers(-12, 3, 16)}
    values["bias"][:2] = [2**31 - 1, -(2**31)]  # saturating sums
    main = tmp_path / "main.c"
    main.write_text(
        "#include <stdbool.h>\n#include <stdint.h>\n#include <stdio.h>\n"
        + source
        + "".join(f"static int32_t {n}[16] = {{{', '.join(str(int(v)) for v in a)}}};\n"
                  for n, a in values.items())
        + "int main(void) {\n  int32_t y[16];\n  tinytrain_requantize(acc, bias, mult, shift, y);\n"
          "  for (int i = 0; i < 16; ++i) printf(\"%d\\n\", (int)y[i]);\n  return 0;\n}\n")
    exe = tmp_path / "main"
    subprocess.run(["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(main)],
                   check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = np.array([int(v) for v in out.split()], np.int32)
    assert np.array_equal(got, _numpy_requantize(*(np.asarray(v, np.int64) for v in values.values())))


def _requantize_inputs():
    rng = np.random.default_rng(1)
    values = {"acc": rng.integers(-(1 << 20), 1 << 20, 16), "bias": rng.integers(-(1 << 16), 1 << 16, 16),
              "mult": rng.integers(1 << 30, (1 << 31) - 1, 16), "shift": rng.integers(-12, 3, 16)}
    values["bias"][:2] = [2**31 - 1, -(2**31)]  # saturating sums
    return [np.asarray(v, np.int32) for v in values.values()]


@pytest.mark.parametrize("pipeline", [set_aside.tir_pipeline(), "default"])
def test_the_llvm_build_computes_tflite_requantization(pipeline):
    """The requantization built by TVM's llvm backend, with its value set aside through TVM's
    pipeline or not, equals TFLite's arithmetic."""
    func = _func(lambda i, acc, b, m, s: _requantize(acc, b, m, s)).with_attr("global_symbol", "requantize")
    lib = tvm.tirx.build(tvm.IRModule({"requantize": func}), "llvm", pipeline=pipeline)
    inputs = _requantize_inputs()
    args = [tvm.runtime.tensor(v) for v in inputs] + [tvm.runtime.tensor(np.zeros(16, np.int32))]
    lib["requantize"](*args)
    assert np.array_equal(args[-1].numpy(), _numpy_requantize(*(v.astype(np.int64) for v in inputs)))


def test_the_llvm_pipeline_sets_the_requantization_aside(monkeypatch):
    """While TVM's passes run, the requantization is a placeholder call (what makes them fast)."""
    seen = []
    put_back = set_aside.SetAside.put_back
    monkeypatch.setattr(set_aside.SetAside, "put_back",
                        lambda self, f: seen.append(f.script()) or put_back(self, f))
    func = _func(lambda i, acc, b, m, s: _requantize(acc, b, m, s)).with_attr("global_symbol", "requantize")
    tvm.tirx.build(tvm.IRModule({"requantize": func}), "llvm", pipeline=set_aside.tir_pipeline())
    assert any(f"{PLACEHOLDER}0" in text for text in seen)


@pytest.mark.slow
def test_the_llvm_step_is_the_same_with_the_set_aside(tmp_path, monkeypatch):
    """A tiny int8 MobileNet's host step (TVM's own int8 kernels), built with the requantization set
    aside and without: the same losses, logits and parameters, bit for bit (~40 s CPU)."""
    mod, params = tt.load_model(tiny_int8_mobilenet(tmp_path), float_classifier=False)
    scheme = {"bias": {"last": 4}, "weights": {"5": 0.5}, "classifier": True}
    train_mod = tt.relay.transform.TinyTrain(scheme, optimizer=tt.SGD(lr=0.05))(mod)
    runs = []
    for pipeline in (set_aside.tir_pipeline(), "default"):
        monkeypatch.setattr(set_aside, "tir_pipeline", lambda name=pipeline: name)
        trainer = HostTrainer(train_mod, params, "llvm", hand_kernels=False)
        x = np.random.default_rng(0).integers(-128, 128, trainer.input_shape).astype(trainer.input_dtype)
        losses = [trainer.step(x, 1) for _ in range(3)]
        runs.append((losses, trainer.predict(x), trainer.params()))
    (losses, logits, learned), (losses_, logits_, learned_) = runs
    assert losses == losses_ and np.array_equal(logits, logits_)
    assert learned.keys() == learned_.keys() and all(np.array_equal(learned[n], learned_[n]) for n in learned)

"""The hand-written int8 kernels (codegen/runtime/tinytrain_s8.c) against the TVM-generated C of
the same TE kernels, bit for bit: on the host (plain C and the SMLAD-shaped code with the
intrinsics in C), in place, and on the emulated Cortex-M7 with the real SMLAD; plus their
instruction counts there."""

from __future__ import annotations

import ctypes
import re
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import tvm
from conftest import require_tools
from tvm import relax

from relay_passes import int8_ops
from relay_passes.int8_ops import QConvParams
from tvm_tinytrain.codegen import s8_kernels
from tvm_tinytrain.codegen.kernels import kernels_c

RUNTIME = resources.files("tvm_tinytrain.codegen").joinpath("runtime")
TEMPLATE = Path(__file__).resolve().parents[1] / "microtvm_projects" / "qemu_cortex_m7"
CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]
ARM = ["-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-sp-d16", "-mfloat-abi=hard"]


@dataclass
class Case:
    """One quantized layer: x (1, c, h, w) or (1, k); w OIHW or (O, K); its QConvParams."""

    name: str
    x_shape: tuple
    w_shape: tuple
    q: QConvParams
    linear: bool = False
    big_bias: bool = False  # biases at the int32 limits: the saturating bias add


def _q(rng, out_c, strides=(1, 1), padding=(0, 0, 0, 0), groups=1, relu6=False, big_shift=False,
       unshifted=False):
    """unshifted: every shift 0 and multipliers under 2^25, as relay_passes' quantizer gives them"""
    zx, zy = (int(v) for v in rng.integers(-128, 128, 2))
    lo, hi = (zy, min(127, zy + 90)) if relu6 else (-128, 127)
    mult_range = (1 << 22, 1 << 25) if unshifted else (1 << 30, 1 << 31)
    mult = tuple(int(v) for v in rng.integers(*mult_range, out_c))
    low, high = (0, 1) if unshifted else (-16, 4) if big_shift else (-14, -5)
    shift = tuple(int(v) for v in rng.integers(low, high, out_c))
    return QConvParams(0.05, zx, (0.01,) * out_c, 0.1, zy, int(lo), int(hi), tuple(strides), tuple(padding),
                       groups, mult, shift)


def _cases() -> list[Case]:
    rng = np.random.default_rng(19)
    cases = []

    def conv(name, c, h, w, o, k, stride=1, pad=(0, 0, 0, 0), big_bias=False, **kw):
        q = _q(rng, o, (stride, stride), pad, **kw)
        cases.append(Case(name, (1, c, h, w), (o, c, k, k), q, big_bias=big_bias or "big_shift" in kw))

    def depthwise(name, c, h, w, k, stride=1, pad=(0, 0, 0, 0), big_bias=False, **kw):
        q = _q(rng, c, (stride, stride), pad, groups=c, **kw)
        cases.append(Case(name, (1, c, h, w), (c, 1, k, k), q, big_bias=big_bias or "big_shift" in kw))

    conv("pw_16_24", 16, 6, 6, 24, 1)
    conv("pw_odd", 7, 5, 3, 5, 1, relu6=True)           # odd channels, odd pixel count, k % 4 == 3
    conv("pw_shift", 13, 4, 4, 6, 1, big_shift=True)    # positive shifts: the saturating bias add
    conv("pw_1x1_s2", 10, 7, 7, 6, 1, stride=2)          # 1x1 stride 2: the im2col conv
    conv("stem_3x3_s2", 3, 9, 9, 8, 3, stride=2, pad=(0, 0, 1, 1))
    conv("conv_3x3", 5, 6, 7, 3, 3, pad=(1, 1, 1, 1), relu6=True)
    conv("conv_5x5_top", 2, 6, 6, 5, 5, pad=(2, 1, 0, 2))  # asymmetric: band_rows' top-only pads
    conv("conv_7x7_s2", 3, 11, 10, 4, 7, stride=2, pad=(3, 3, 3, 3), big_shift=True)
    depthwise("dw_3x3_s1", 5, 7, 6, 3, pad=(1, 1, 1, 1), relu6=True)
    depthwise("dw_3x3_s2", 6, 9, 8, 3, stride=2, pad=(0, 0, 1, 1))
    depthwise("dw_3x3_s2_odd", 3, 10, 11, 3, stride=2, pad=(1, 1, 1, 1), big_shift=True)
    depthwise("dw_3x3_top", 4, 5, 5, 3, pad=(1, 1, 0, 1))
    depthwise("dw_5x5", 3, 8, 7, 5, pad=(2, 2, 2, 2))
    depthwise("dw_7x7_s2", 3, 12, 9, 7, stride=2, pad=(3, 2, 3, 3), relu6=True)
    depthwise("dw_3x3_nopad", 2, 6, 5, 3)
    for name, k, o in (("fc_10", 37, 10), ("fc_big", 64, 3)):
        q = _q(rng, o, big_shift=name == "fc_big")
        cases.append(Case(name, (1, k), (o, k), q, linear=True, big_bias=name == "fc_big"))
    conv("pw_big_bias", 9, 4, 5, 4, 1, big_bias=True)  # shifts <= 0, a bias that saturates
    depthwise("dw_big_bias", 3, 6, 6, 3, pad=(1, 1, 1, 1), big_bias=True)
    # every shift 0 (MobileNetV2's layers): the fast requantization with no rounding shift
    conv("pw_8_12_unshifted", 8, 3, 6, 12, 1, unshifted=True)
    conv("pw_16_5_unshifted", 16, 3, 5, 5, 1, unshifted=True)
    conv("stem_unshifted", 3, 7, 10, 6, 3, stride=2, pad=(0, 1, 0, 1), unshifted=True)
    depthwise("dw_3x3_unshifted", 5, 5, 8, 3, pad=(0, 1, 0, 1), unshifted=True)
    depthwise("dw_3x3_s2_unshifted", 4, 5, 9, 3, stride=2, pad=(0, 1, 0, 1), unshifted=True)
    conv("pw_12_7_unshifted", 12, 3, 3, 7, 1, unshifted=True)
    conv("pw_8_6_relu6_unshifted", 8, 2, 5, 6, 1, relu6=True, unshifted=True)
    # MobileNetV2's last maps, which have their own unrolled copies
    depthwise("dw_3x3_4x4_unshifted", 6, 4, 4, 3, pad=(1, 1, 1, 1), unshifted=True)
    depthwise("dw_3x3_s2_2x2_unshifted", 5, 4, 4, 3, stride=2, pad=(0, 0, 1, 1), unshifted=True)
    return cases


CASES = _cases()


def _tagged_kernel(case: Case) -> tvm.tirx.PrimFunc:
    """The PrimFunc that int8_ops emits for the case's layer (tagged tinytrain.qop)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(case.x_shape, "int8"))
    w = relax.Var("w", relax.TensorType(case.w_shape, "int8"))
    b = relax.Var("b", relax.TensorType((case.w_shape[0],), "int32"))
    with bb.function("main", [x, w, b]):
        emit = int8_ops.emit_qlinear if case.linear else int8_ops.emit_qconv
        y = emit(bb, x, w, b, case.q)
        bb.emit_func_output(y)
    mod = bb.get()
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


HARNESS = """#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include "tinytrain_s8.h"
int tinytrain_kernel_failed;
static _Alignas(16) uint8_t tinytrain_test_workspace[1 << 16];
void* tinytrain_workspace_alloc(int device_type, int device_id, uint64_t nbytes, int dtype_code,
                                int dtype_bits) {
  (void)device_type; (void)device_id; (void)dtype_code; (void)dtype_bits;
  return nbytes <= sizeof tinytrain_test_workspace ? tinytrain_test_workspace : NULL;
}
int tinytrain_workspace_free(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id; (void)ptr;
  return 0;
}
"""


@pytest.fixture(scope="module")
def kernels_source():
    """(C source of the TE reference and the hand kernel of every case, the hand PrimFuncs)."""
    funcs, hands = {}, {}
    for i, case in enumerate(CASES):
        te_func = _tagged_kernel(case)
        hand = s8_kernels.hand_kernel(te_func)
        assert hand is not None, case.name
        funcs[f"tinytrain_ref{i}"] = te_func
        funcs[f"tinytrain_hand{i}"] = hand
        hands[case.name] = hand
    return kernels_c(funcs, "tinytrain"), hands


def _library(tmp: Path, source: str, defines: list[str]) -> ctypes.CDLL:
    require_tools("gcc")
    (tmp / "kernels.c").write_text(HARNESS + source)
    lib = tmp / "libkernels.so"
    subprocess.run(["gcc", *CFLAGS, "-shared", "-fPIC", *defines, "-I", str(RUNTIME), str(tmp / "kernels.c"),
                    str(RUNTIME / "tinytrain_s8.c"), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def _inputs(case: Case, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, case.x_shape, dtype=np.int8)
    w = rng.integers(-128, 128, case.w_shape, dtype=np.int8)
    b = rng.integers(-(1 << 14), 1 << 14, case.w_shape[0]).astype(np.int32)
    if case.big_bias:  # biases near the int32 limits: the sum saturates
        b[:2] = [2**31 - 5, -(2**31) + 5]
    return [x, w, b, np.asarray(case.q.mult, np.int32), np.asarray(case.q.shift, np.int32)]


def _out_shape(func) -> tuple:
    return tuple(int(d) for d in func.params[-1].ty.shape)


def _call(lib, symbol: str, arrays: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    getattr(lib, symbol)(*(a.ctypes.data_as(ctypes.c_void_p) for a in [*arrays, out]))
    return out


@pytest.mark.slow  # the TE references' C: about a minute, shared by the three tests that use it
@pytest.mark.parametrize("simd", [0, 1], ids=["plain_c", "smlad_in_c"])
def test_hand_kernels_match_tvm_kernels_bit_for_bit(kernels_source, tmp_path, simd):
    source, hands = kernels_source
    lib = _library(tmp_path, source, [f"-DTINYTRAIN_S8_SIMD={simd}"])
    for i, case in enumerate(CASES):
        shape = _out_shape(hands[case.name])
        for seed in range(3):
            arrays = _inputs(case, seed)
            ref = _call(lib, f"tinytrain_ref{i}", arrays, np.full(shape, 77, np.int8))
            got = _call(lib, f"tinytrain_hand{i}", arrays, np.full(shape, -77, np.int8))
            np.testing.assert_array_equal(got, ref, err_msg=f"{case.name} seed {seed}")
            if not case.big_bias:  # a layer that computes something (not only its saturation)
                assert len(np.unique(ref)) > 2, case.name


@pytest.mark.slow
def test_depthwise_in_place_matches_out_of_place(kernels_source, tmp_path):
    source, hands = kernels_source
    lib = _library(tmp_path, source, ["-DTINYTRAIN_S8_SIMD=1"])
    checked = 0
    for i, case in enumerate(CASES):
        hand = hands[case.name]
        if "tinytrain.inplace_in" not in hand.attrs:
            continue
        assert [int(v) for v in hand.attrs["tinytrain.inplace_in"]] == [0]
        arrays = _inputs(case, 5)
        ref = _call(lib, f"tinytrain_hand{i}", arrays, np.zeros(_out_shape(hand), np.int8))
        x = arrays[0].copy()
        lib[f"tinytrain_hand{i}"](*(a.ctypes.data_as(ctypes.c_void_p) for a in [x, *arrays[1:], x]))
        np.testing.assert_array_equal(x.reshape(-1)[:ref.size], ref.reshape(-1), err_msg=case.name)
        checked += 1
    assert checked >= 6


def test_use_hand_kernels_replaces_covered_kernels_only():
    case = next(c for c in CASES if c.name == "dw_3x3_s2")
    multiplier = Case("dw_x2", (1, 3, 6, 6), (6, 1, 3, 3), QConvParams(0.1, 0, (0.01,) * 6, 0.1, 0, groups=3))
    mod = tvm.IRModule({"a": _tagged_kernel(case), "b": _tagged_kernel(multiplier)})
    out = s8_kernels.use_hand_kernels(mod)
    assert str(out["a"].attrs["tinytrain.hand_kernel"]) == "tinytrain_s8_depthwise"
    assert str(out["a"].attrs["tinytrain.qop"]) == "tinytrain_qconv"
    assert [int(v) for v in out["a"].attrs["tinytrain.qkwargs"]["strides"]] == [2, 2]
    assert [str(p.name) for p in out["a"].params] == [str(p.name) for p in mod["a"].params]
    tvm.ir.assert_structural_equal(out["b"], mod["b"])  # channel multiplier 2: the TE kernel stays
    names = {c.name: str(s8_kernels.hand_kernel(_tagged_kernel(c)).attrs["tinytrain.hand_kernel"])
             for c in CASES if c.name in ("pw_odd", "pw_1x1_s2", "stem_3x3_s2", "fc_10")}
    assert names == {"pw_odd": "tinytrain_s8_conv_1x1", "pw_1x1_s2": "tinytrain_s8_conv",
                     "stem_3x3_s2": "tinytrain_s8_conv", "fc_10": "tinytrain_s8_linear"}


def test_runtime_sources_exist():
    for name in s8_kernels.RUNTIME_SOURCES:
        assert RUNTIME.joinpath(name).is_file()
    header = RUNTIME.joinpath("tinytrain_s8.h").read_text()
    symbols = set(re.findall(r"\b(tinytrain_\w+)\(", header))
    assert {"tinytrain_s8_conv_1x1", "tinytrain_s8_depthwise", "tinytrain_s8_conv",
            "tinytrain_s8_linear"} <= symbols


# ---- the emulated Cortex-M7: the SMLAD path, bit for bit, and its instruction counts ----------
DEVICE_MAIN = r"""
#include <stdint.h>
#include <string.h>
#include "tinytrain_s8.h"

static int32_t tinytrain_semihost(uint32_t op, void* arg) {
  register uint32_t r0 __asm__("r0") = op;
  register void* r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return (int32_t)r0;
}
void tinytrain_exit(int code) {
  uint32_t block[2] = {0x20026u, (uint32_t)code};
  tinytrain_semihost(0x20u, block); /* SYS_EXIT_EXTENDED */
}
static volatile uint32_t tinytrain_wraps;
void tinytrain_systick(void) { tinytrain_wraps++; }

int tinytrain_kernel_failed;
static _Alignas(16) uint8_t tinytrain_test_workspace[1 << 14];
void* tinytrain_workspace_alloc(int device_type, int device_id, uint64_t nbytes, int dtype_code,
                                int dtype_bits) {
  (void)device_type; (void)device_id; (void)dtype_code; (void)dtype_bits;
  return nbytes <= sizeof tinytrain_test_workspace ? tinytrain_test_workspace : NULL;
}
int tinytrain_workspace_free(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id; (void)ptr;
  return 0;
}
"""


DEVICE_COUNTING = r"""
static void tinytrain_print(const char* text) { tinytrain_semihost(0x04u, (void*)text); } /* SYS_WRITE0 */
static void tinytrain_print_u32(uint32_t v) {
  char text[12];
  int i = 11;
  text[i] = 0;
  do { text[--i] = (char)('0' + v % 10u); v /= 10u; } while (v);
  tinytrain_print(text + i);
}

#define SYST_CSR (*(volatile uint32_t*)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t*)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t*)0xE000E018u)
/* instructions so far: under -icount shift=0 one 25 MHz SysTick tick is 40 instructions */
static uint32_t tinytrain_instructions(void) {
  uint32_t wraps, now;
  do { wraps = tinytrain_wraps; now = SYST_CVR; } while (wraps != tinytrain_wraps);
  return (wraps * 0x1000000u + (0xFFFFFFu - now)) * 40u;
}

static uint32_t tinytrain_seed = 12345u;
static void tinytrain_fill(void* p, uint32_t n) {
  uint8_t* b = (uint8_t*)p;
  for (uint32_t i = 0; i < n; ++i) {
    tinytrain_seed = tinytrain_seed * 1664525u + 1013904223u;
    b[i] = (uint8_t)(tinytrain_seed >> 24);
  }
}
"""


def _c_array(name: str, a: np.ndarray) -> str:
    ctype = {np.dtype(np.int8): "int8_t", np.dtype(np.int32): "int32_t"}[a.dtype]
    values = ",".join(str(int(v)) for v in a.reshape(-1))
    return f"static {ctype} {name}[{a.size}] = {{{values}}};\n"


def _cortex_m7_run(tmp: Path, sources: list[Path]) -> tuple[int, str]:
    """Build ``sources`` with the QEMU template's start-up and link script; (exit code, stderr)."""
    require_tools("arm-none-eabi-gcc", "qemu-system-arm")
    (tmp / "startup.c").write_text((TEMPLATE / "startup.c").read_text())
    subprocess.run(["arm-none-eabi-gcc", "-E", "-P", "-x", "c", "-DRAM_KB=1024", "-DFLASH_KB=1024",
                    "-DSTACK_KB=16", str(TEMPLATE / "link.ld.in"), "-o", str(tmp / "link.ld")], check=True)
    elf = tmp / "test.elf"
    # the QEMU template's flags
    subprocess.run(["arm-none-eabi-gcc", *ARM, *CFLAGS, "-funroll-loops", "-ffunction-sections",
                    "-fdata-sections", "-I", str(RUNTIME), str(tmp / "startup.c"), *map(str, sources),
                    str(RUNTIME / "tinytrain_s8.c"), "-nostartfiles", "--specs=nano.specs",
                    "--specs=nosys.specs", "-Wl,--gc-sections", "-T", str(tmp / "link.ld"), "-o", str(elf)],
                   check=True)
    run = subprocess.run(["qemu-system-arm", "-M", "mps2-an500", "-display", "none", "-monitor", "none",
                          "-serial", "none", "-semihosting-config", "enable=on,target=native",
                          "-icount", "shift=0", "-kernel", str(elf)],
                         capture_output=True, text=True, timeout=300)
    return run.returncode, run.stderr


@pytest.mark.slow
def test_smlad_kernels_on_cortex_m7_match_host(kernels_source, tmp_path):
    """Every case's hand kernel on the emulated Cortex-M7 (SMLAD, SXTB16) gives the host's TVM
    kernel's output; the in-place depthwise too."""
    source, hands = kernels_source
    lib = _library(tmp_path, source, [])
    data, body = [], []
    for i, case in enumerate(CASES):
        arrays = _inputs(case, 7)
        shape = _out_shape(hands[case.name])
        expect = _call(lib, f"tinytrain_ref{i}", arrays, np.zeros(shape, np.int8))
        names = [f"case{i}_{n}" for n in ("x", "w", "b", "m", "s")]
        data += [_c_array(n, a) for n, a in zip(names, arrays)]
        data.append(_c_array(f"case{i}_expect", expect))
        data.append(f"static int8_t case{i}_y[{expect.size}];\n")
        args = ", ".join(names)
        body.append(f"  tinytrain_hand{i}({args}, case{i}_y);\n"
                    f"  if (memcmp(case{i}_y, case{i}_expect, {expect.size})) failed |= 1;\n")
        if "tinytrain.inplace_in" in hands[case.name].attrs:
            body.append(f"  tinytrain_hand{i}({args}, case{i}_x);\n"
                        f"  if (memcmp(case{i}_x, case{i}_expect, {expect.size})) failed |= 2;\n")
    main = DEVICE_MAIN + source + "".join(data) + "int main(void) {\n  int failed = 0;\n" + "".join(body)
    (tmp_path / "main.c").write_text(main + "  return failed;\n}\n")
    code, err = _cortex_m7_run(tmp_path, [tmp_path / "main.c"])
    assert code == 0, err


# MobileNetV2-w0.35's layer shapes at 128x128 (every one of its layers clamps to the whole int8 range and
# has shift 0, its multipliers under 2^23):
# (case, instructions per MAC at most, a little above what arm-none-eabi-gcc 12.2 -O2 -funroll-loops gives)
def _bench(name, x_shape, w_shape, strides=(1, 1), padding=(0, 0, 0, 0), groups=1) -> Case:
    out_c = w_shape[0]
    return Case(name, x_shape, w_shape, QConvParams(0.1, -128, (0.01,) * out_c, 0.1, -128, -128, 127, strides,
                                                    padding, groups))


BENCH = [
    (_bench("pw_16_96_32x32", (1, 16, 32, 32), (96, 16, 1, 1)), 2.0),
    (_bench("pw_96_24_16x16", (1, 96, 16, 16), (24, 96, 1, 1)), 2.0),
    (_bench("dw_96_3x3_s1_16x16", (1, 96, 16, 16), (96, 1, 3, 3), (1, 1), (1, 1, 1, 1), 96), 2.8),
    (_bench("dw_96_3x3_s2_32x32", (1, 96, 32, 32), (96, 1, 3, 3), (2, 2), (0, 0, 1, 1), 96), 3.7),
    # its last stages' small maps, where a channel's fixed costs weigh most
    (_bench("dw_336_3x3_s1_4x4", (1, 336, 4, 4), (336, 1, 3, 3), (1, 1), (1, 1, 1, 1), 336), 4.0),
    (_bench("dw_336_3x3_s2_4x4", (1, 336, 4, 4), (336, 1, 3, 3), (2, 2), (0, 0, 1, 1), 336), 9.6),
    # ProxylessNAS / MCUNet kernels
    (_bench("dw_48_5x5_s1_16x16", (1, 48, 16, 16), (48, 1, 5, 5), (1, 1), (2, 2, 2, 2), 48), 3.5),
    (_bench("dw_48_7x7_s2_32x32", (1, 48, 32, 32), (48, 1, 7, 7), (2, 2), (2, 2, 3, 3), 48), 3.5),
    # MobileNetV2's first block, computed in row bands (relay_passes/band_rows.py): one band's calls
    (_bench("stem_3_16_3x3_s2_band", (1, 3, 11, 128), (16, 3, 3, 3), (2, 2), (0, 1, 0, 1)), 2.4),
    (_bench("dw_16_3x3_s1_band", (1, 16, 5, 64), (16, 1, 3, 3), (1, 1), (0, 1, 0, 1), 16), 2.5),
    (_bench("pw_16_8_band", (1, 16, 3, 64), (8, 16, 1, 1)), 2.9),
    (_bench("pw_8_48_band", (1, 8, 3, 64), (48, 8, 1, 1)), 2.3),
    (_bench("dw_48_3x3_s2_band", (1, 48, 3, 64), (48, 1, 3, 3), (2, 2), (0, 1, 0, 1), 48), 4.1),
]


def _macs(case: Case, out_shape) -> int:
    return int(np.prod(out_shape)) * int(np.prod(case.w_shape[1:]))


def test_instructions_per_mac_on_cortex_m7(tmp_path):
    """MobileNetV2's pointwise and depthwise layers on the emulated Cortex-M7, requantization
    included: instructions per MAC, deterministic (two runs agree to the instruction)."""
    funcs = {f"tinytrain_bench{i}": s8_kernels.hand_kernel(_tagged_kernel(case))
             for i, (case, _) in enumerate(BENCH)}
    lines, body = [], []
    for i, (case, _) in enumerate(BENCH):
        shape = _out_shape(funcs[f"tinytrain_bench{i}"])
        sizes = (np.prod(case.x_shape), np.prod(case.w_shape), case.w_shape[0], np.prod(shape))
        lines.append(f"static int8_t b{i}_x[{sizes[0]}], b{i}_w[{sizes[1]}], b{i}_y[{sizes[3]}];\n"
                     f"static int32_t b{i}_b[{sizes[2]}], b{i}_m[{sizes[2]}], b{i}_s[{sizes[2]}];\n")
        body.append(f"""  tinytrain_fill(b{i}_x, sizeof b{i}_x);
  tinytrain_fill(b{i}_w, sizeof b{i}_w);
  for (int i = 0; i < {sizes[2]}; ++i) {{
    tinytrain_fill(&b{i}_m[i], 4);
    b{i}_b[i] = (b{i}_m[i] & 0xFFFF) - 0x8000;
    b{i}_s[i] = 0;
    b{i}_m[i] = (int32_t)(0x400000u | ((uint32_t)b{i}_m[i] & 0x3FFFFFu));
  }}
  start = tinytrain_instructions();
  tinytrain_bench{i}(b{i}_x, b{i}_w, b{i}_b, b{i}_m, b{i}_s, b{i}_y);
  tinytrain_print_u32(tinytrain_instructions() - start);
  tinytrain_print("\\n");
""")
    start = "int main(void) {\n  SYST_RVR = 0xFFFFFFu;\n  SYST_CVR = 0;\n  SYST_CSR = 7u;\n"
    start += "  uint32_t start;\n"
    main = (DEVICE_MAIN + DEVICE_COUNTING + kernels_c(funcs, "tinytrain") + "".join(lines) + start
            + "".join(body) + "  return 0;\n}\n")
    (tmp_path / "main.c").write_text(main)
    runs = []
    for _ in range(2):
        code, err = _cortex_m7_run(tmp_path, [tmp_path / "main.c"])
        assert code == 0, err
        runs.append([int(v) for v in err.split()])
    assert runs[0] == runs[1]
    for (case, bound), count in zip(BENCH, runs[0]):
        per_mac = count / _macs(case, _out_shape(funcs[f"tinytrain_bench{BENCH.index((case, bound))}"]))
        print(f"{case.name}: {count} instructions, {per_mac:.2f} per MAC")
        assert per_mac <= bound, case.name

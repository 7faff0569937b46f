"""The board templates: zephyr (a Zephyr application, not buildable here) and cortex_m_lib (a static
library for the user's own firmware).

Zephyr: a project made through ``micro.create_project`` holds the application, its board files
place two erase-aligned slots above the program (checked against the STM32 reference manuals'
sector maps), every C file that is not Zephyr glue compiles with arm-none-eabi-gcc ``-Werror`` for
the Cortex-M7 boards and the Cortex-M3 of mps2/an385, and ``tinytrain micro build`` without west
exits 2 naming what to install. cortex_m_lib: the library builds for the four cores (checked in
the archive's build attributes), the README's C block links against each, and on QEMU's
Cortex-M7 its losses equal the TVM host trainer's.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import require_tools

import tvm_tinytrain as tt
from tvm_tinytrain import micro, zoo

STRICT = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-O2"]
CORES = {  # the flags a Cortex-M7 board build and the an385 build use for the shared C
    "cortex-m7": ["-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-sp-d16", "-mfloat-abi=hard"],
    "cortex-m3": ["-mcpu=cortex-m3", "-mthumb", "-mfloat-abi=soft"],
}
STEPS = 6
LR = 0.05


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(artifact, train module, params, samples, labels, working folder): zoo.small_cnn, 5 classes."""
    root = tmp_path_factory.mktemp("boards")
    onnx.save(zoo.small_cnn(num_classes=5, input_hw=(8, 8), width=4, seed=1), root / "m.onnx")
    mod, params = tt.load_model(root / "m.onnx")
    train_mod = tt.relay.transform.TinyTrain("full", optimizer=tt.SGD(lr=LR))(mod)
    artifact = tt.build(train_mod, params, target="c")
    rng = np.random.default_rng(0)  # two samples, in turn: the loss of each goes down
    xs = np.tile(rng.standard_normal((2, 1, 1, 8, 8)).astype("float32"), (STEPS // 2, 1, 1, 1, 1))
    ys = np.tile(rng.integers(0, 5, 2), STEPS // 2)
    return artifact, train_mod, params, xs, ys, root


# ---- zephyr ---------------------------------------------------------------------------------------

def _zephyr(small, name="zephyr", board=None):
    artifact, *_, root = small
    return micro.create_project(artifact, "zephyr", root / name, board=board, force=True)


def test_zephyr_project_holds_the_application(small):
    project = _zephyr(small, board="nucleo_h743zi")
    path = project.path
    assert project.board == "nucleo_h743zi" and micro.open_project(path).board == "nucleo_h743zi"
    cmake = (path / "CMakeLists.txt").read_text()
    assert "find_package(Zephyr" in cmake and "common/*.c" in cmake and "model/src/*.c" in cmake
    conf = (path / "prj.conf").read_text()
    for line in ("CONFIG_UART_CONSOLE=n", "CONFIG_UART_INTERRUPT_DRIVEN=y", "CONFIG_FLASH_MAP=y",
                 "CONFIG_INIT_STACKS=y", "CONFIG_THREAD_STACK_INFO=y"):
        assert line in conf.splitlines(), line
    main = (path / "src" / "main.c").read_text()
    for call in ("uart_fifo_read", "k_thread_stack_space_get", "FIXED_PARTITION_ID(storage_partition)",
                 "flash_area_erase", "flash_get_write_block_size", "tinytrain_device_run()"):
        assert call in main, call
    assert "malloc" not in main and "k_malloc" not in main
    for board in micro.template_info("zephyr").boards:
        assert (path / "boards" / (board.replace("/", "_") + ".overlay")).is_file(), board
    assert (path / "common" / "tinytrain_port.h").is_file()
    assert (path / "model" / "include" / "tinytrain_model.h").is_file()
    spec = project.template
    assert spec["build"][:2] == ["west", "build"] and "{board}" in spec["build"] and "-p" in spec["build"]
    assert spec["flash"][:2] == ["west", "flash"] and spec["cost_unit"] == "cycles" and "run" not in spec
    assert "ZEPHYR_BASE" in spec["env"]


# Erase sectors from the reference manuals (RM0385 F746, RM0410 F767 single bank, RM0433 H743).
KB = 1024
SECTORS = {
    "nucleo_f746zg": [32 * KB] * 4 + [128 * KB] + [256 * KB] * 3,
    "nucleo_f767zi": [32 * KB] * 4 + [128 * KB] + [256 * KB] * 7,
    "nucleo_h743zi": [128 * KB] * 16,
}


def _partition(overlay: str, label: str) -> tuple[int, int]:
    node = re.search(label + r": partition@[0-9a-f]+ \{(.*?)\};", overlay, re.S)
    assert node, label
    reg = re.search(r"reg = <(0x[0-9a-fA-F]+) DT_SIZE_K\((\d+)\)>", node.group(1))
    return int(reg.group(1), 16), int(reg.group(2)) * KB


@pytest.mark.parametrize("board", sorted(SECTORS))
def test_zephyr_storage_halves_are_erase_aligned_above_the_program(board):
    overlay = (micro.TEMPLATES / "zephyr" / "boards" / f"{board}.overlay").read_text()
    starts = np.cumsum([0] + SECTORS[board]).tolist()
    offset, size = _partition(overlay, "storage_partition")
    code_offset, code_size = _partition(overlay, "code_partition")
    assert offset in starts and offset + size / 2 in starts and offset + size == starts[-1]
    assert code_offset == 0 and code_size <= offset
    assert "zephyr,code-partition = &code_partition" in overlay
    conf = (micro.TEMPLATES / "zephyr" / "boards" / f"{board}.conf").read_text()
    assert "CONFIG_USE_DT_CODE_PARTITION=y" in conf


@pytest.mark.parametrize("core", sorted(CORES))
def test_zephyr_shared_c_compiles_for_the_boards(small, core):
    """common/*.c and model/src/*.c, as the Zephyr build compiles them (src/main.c needs Zephyr)."""
    require_tools("arm-none-eabi-gcc")
    path = _zephyr(small, name=f"zephyr-{core}").path
    sources = sorted(path.glob("common/*.c")) + sorted(path.glob("model/src/*.c"))
    assert len(sources) >= 6
    for src in sources:
        result = subprocess.run(["arm-none-eabi-gcc", *CORES[core], *STRICT, "-Icommon", "-Imodel/include",
                                 "-Imodel/src", "-c", str(src.relative_to(path)), "-o", "/dev/null"],
                                cwd=path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_zephyr_build_without_west_exits_2_naming_what_to_install(small, tmp_path, monkeypatch, capsys):
    from tvm_tinytrain import cli

    path = _zephyr(small, name="zephyr-nowest").path
    monkeypatch.setenv("PATH", str(tmp_path))  # no west, cmake or ninja
    monkeypatch.delenv("ZEPHYR_BASE", raising=False)
    assert cli.main(["micro", "build", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "west" in err and "ZEPHYR_BASE" in err and "pip install west" in err
    with pytest.raises(micro.ToolMissingError):
        micro.open_project(path).build()


# ---- cortex_m_lib ---------------------------------------------------------------------------------

LIB_CORES = {  # build attributes of the archive (readelf -A), from the Arm ELF ABI addenda
    "cortex-m4": ('Tag_CPU_name: "7E-M"', "Tag_FP_arch: VFPv4-D16"),
    "cortex-m7": ('Tag_CPU_name: "7E-M"', "Tag_FP_arch: FPv5/FP-D16 for ARMv8"),
    "cortex-m33": ('Tag_CPU_name: "8-M.MAIN"', "Tag_FP_arch: FPv5/FP-D16 for ARMv8"),
    "cortex-m55": ('Tag_CPU_name: "cortex-m55"', "Tag_MVE_arch: MVE Integer and FP"),
}
LINK_FLAGS = {"cortex-m4": "-mfpu=fpv4-sp-d16", "cortex-m7": "-mfpu=fpv5-sp-d16",
              "cortex-m33": "-mfpu=fpv5-sp-d16", "cortex-m55": "-mfpu=auto"}


def _readme_block() -> str:
    """The C block of cortex_m_lib/README.md, compiled as it is printed there."""
    text = (micro.TEMPLATES / "cortex_m_lib" / "README.md").read_text()
    blocks = re.findall(r"```c\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    return blocks[0]


def _c_floats(values) -> str:
    return ", ".join(f"{v!r}f" for v in np.asarray(values, np.float32).reshape(-1).tolist())


MAIN = r"""
#include <stdint.h>
#include <string.h>
#include "tinytrain_model.h"
void boot(int have_checkpoint);
float learn(const tinytrain_input_t* x, tinytrain_label_t y);
int classify(const tinytrain_input_t* x);

static const float samples[STEPS][TINYTRAIN_INPUT_BYTES / 4] = {SAMPLES};
static const tinytrain_label_t labels[STEPS] = {LABELS};

static int32_t semihost(uint32_t op, void* arg) {
  register uint32_t r0 __asm__("r0") = op;
  register void* r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return (int32_t)r0;
}

static void put_hex(uint32_t v) { /* 8 hex digits and a newline, through SYS_WRITE0 */
  char line[10];
  for (int i = 0; i < 8; ++i) line[i] = "0123456789abcdef"[(v >> (28 - 4 * i)) & 15u];
  line[8] = '\n';
  line[9] = 0;
  semihost(0x04u, line);
}

static void put_float(float f) { uint32_t v; memcpy(&v, &f, 4); put_hex(v); }

int main(void) {
  boot(0);
  for (int i = 0; i < STEPS; ++i) put_float(learn(samples[i], labels[i]));
  put_hex((uint32_t)classify(samples[0]));
  boot(1);                                   /* a reset: the checkpoint of the last step */
  put_float(learn(samples[0], labels[0]));   /* goes on from there */
  return 0;
}

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;

void reset_handler(void) {
  for (uint32_t *src = &_sidata, *dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (uint32_t* dst = &_sbss; dst < &_ebss;) *dst++ = 0;
  *(volatile uint32_t*)0xE000ED88u |= 0xFu << 20; /* CPACR: the FPU (and Helium) on */
  __asm__ volatile("dsb\n isb");
  uint32_t block[2] = {0x20026u, (uint32_t)main()}; /* SYS_EXIT_EXTENDED */
  semihost(0x20u, block);
  for (;;) {}
}

static void fault(void) { uint32_t block[2] = {0x20026u, 99u}; semihost(0x20u, block); for (;;) {} }

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))&_estack, reset_handler, fault, fault, fault, fault, fault};
"""

LINK_SCRIPT = """
ENTRY(reset_handler)
MEMORY { FLASH (rx) : ORIGIN = 0x0, LENGTH = 1M  RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 320K }
SECTIONS {
  .vectors : { KEEP(*(.vectors)) } > FLASH
  .text : { *(.text*) *(.rodata*) } > FLASH
  .ARM.exidx : { *(.ARM.exidx*) } > FLASH
  .data : { _sdata = .; *(.data*) . = ALIGN(4); _edata = .; } > RAM AT > FLASH
  _sidata = LOADADDR(.data);
  .bss (NOLOAD) : { _sbss = .; *(.bss*) *(COMMON) . = ALIGN(4); _ebss = .; } > RAM
  end = .;
  _estack = ORIGIN(RAM) + LENGTH(RAM);
}
"""


@pytest.fixture(scope="module")
def libraries(small):
    """{core: cortex_m_lib project built for it}."""
    require_tools("arm-none-eabi-gcc", "make")
    artifact, *_, root = small
    out = {}
    for core in LIB_CORES:
        project = micro.create_project(artifact, "cortex_m_lib", root / f"lib-{core}", {"cpu": core})
        assert project.build() == project.path / "build" / "libtinytrain.a"
        out[core] = project
    return out


@pytest.mark.parametrize("core", sorted(LIB_CORES))
def test_cortex_m_lib_builds_for_the_core(libraries, core):
    project = libraries[core]
    archive = project.path / "build" / "libtinytrain.a"
    attributes = subprocess.run(["arm-none-eabi-readelf", "-A", str(archive)], capture_output=True, text=True,
                                check=True).stdout
    for tag in (*LIB_CORES[core], "Tag_ABI_VFP_args: VFP registers"):
        assert tag in attributes, (core, tag)
    headers = sorted(p.name for p in (project.path / "build" / "include").glob("*.h"))
    assert {"tinytrain_model.h", "tinytrain_port.h"} <= set(headers)
    symbols = subprocess.run(["arm-none-eabi-nm", "-g", "--defined-only", str(archive)], capture_output=True,
                             text=True, check=True).stdout
    defined = {line.split()[-1] for line in symbols.splitlines() if len(line.split()) == 3}
    assert {"tinytrain_init", "tinytrain_train_step", "tinytrain_predict", "tinytrain_device_run"} <= defined
    assert all(name.startswith("tinytrain_") for name in defined), sorted(defined)


def _program(small, project: micro.Project, core: str) -> Path:
    """The README's block and a bare-metal main, linked against the project's library."""
    _, _, _, xs, ys, _ = small
    folder = project.path / "example"
    folder.mkdir(exist_ok=True)
    (folder / "readme.c").write_text(_readme_block())
    samples = ", ".join("{" + _c_floats(x) + "}" for x in xs)
    main = MAIN.replace("STEPS", str(STEPS)).replace("{SAMPLES}", "{" + samples + "}")
    (folder / "main.c").write_text(main.replace("{LABELS}", "{" + ", ".join(str(int(y)) for y in ys) + "}"))
    (folder / "link.ld").write_text(LINK_SCRIPT)
    arch = [f"-mcpu={core}", "-mthumb", LINK_FLAGS[core], "-mfloat-abi=hard"]
    elf = folder / "example.elf"
    result = subprocess.run(
        ["arm-none-eabi-gcc", *arch, *STRICT, "-I", str(project.path / "build" / "include"),
         str(folder / "readme.c"), str(folder / "main.c"), str(project.path / "build" / "libtinytrain.a"),
         "-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections",
         "-T", str(folder / "link.ld"), "-lm", "-o", str(elf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return elf


@pytest.mark.parametrize("core", sorted(LIB_CORES))
def test_cortex_m_lib_readme_calls_link(small, libraries, core):
    elf = _program(small, libraries[core], core)
    symbols = subprocess.run(["arm-none-eabi-nm", str(elf)], capture_output=True, text=True,
                             check=True).stdout
    assert " T tinytrain_train_step" in symbols and " T learn" in symbols
    assert "tinytrain_device_run" not in symbols  # the protocol server only when called


def test_cortex_m_lib_trains_on_qemu_cortex_m7(small, libraries):
    """The README's calls on an emulated Cortex-M7: each step's loss equals the TVM host trainer's,
    the loss goes down, and after a reset the checkpoint goes on from the last step."""
    require_tools("qemu-system-arm")
    _, train_mod, params, xs, ys, _ = small
    elf = _program(small, libraries["cortex-m7"], "cortex-m7")
    run = subprocess.run(["qemu-system-arm", "-M", "mps2-an500", "-display", "none", "-monitor", "none",
                          "-serial", "none", "-semihosting-config", "enable=on,target=native",
                          "-kernel", str(elf)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    words = [int(w, 16) for w in run.stderr.split()]
    assert len(words) == STEPS + 2, run.stderr
    losses = [struct.unpack("<f", struct.pack("<I", w))[0] for w in words[:STEPS]]
    ref = tt.build(train_mod, params)
    expected = [ref.step(x, int(y)) for x, y in zip(xs, ys)]
    np.testing.assert_allclose(losses, expected, rtol=1e-4)
    assert words[STEPS] == int(np.argmax(ref.predict(xs[0])))
    after_reset = struct.unpack("<f", struct.pack("<I", words[STEPS + 1]))[0]
    assert after_reset == pytest.approx(ref.step(xs[0], int(ys[0])), rel=1e-4)
    assert after_reset < losses[0]  # the same sample, after STEPS steps: it learned


def test_option_defaults_are_what_the_builds_do():
    """list-templates' defaults: the library Makefile's ?= values, the Zephyr prj.conf's stack."""
    lib = micro.template_info("cortex_m_lib")
    makefile = (lib.path / "Makefile").read_text()
    make_defaults = dict(re.findall(r"^(\w+) \?= (.*)$", makefile, re.M))
    for option in lib.options.values():
        assert make_defaults[option.variable] == option.default, option.name
    zephyr = micro.template_info("zephyr")
    conf = dict(line.split("=", 1) for line in (zephyr.path / "prj.conf").read_text().splitlines()
                if line.startswith("CONFIG_"))
    for option in zephyr.options.values():
        assert conf[option.variable] == option.default, option.name


# ---- benchmarks/nucleo.py -------------------------------------------------------------------------

def test_nucleo_benchmark_on_qemu(capsys):
    """Without a serial port the benchmark runs the QEMU project: it trains, counts instructions,
    and the SRAM it measures (static + stack high-water) covers the plan."""
    require_tools("arm-none-eabi-gcc", "make", "qemu-system-arm")
    from benchmarks import nucleo

    assert nucleo.main(["--epochs", "1", "--limit", "400", "--lr", "0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["template"] == "qemu_cortex_m7" and out["cost_unit"] == "instructions"
    assert out["steps"] == 400 and out["eval_samples"] == 540 and out["saves"] == 1
    assert out["cost_per_step"] > 0
    assert out["accuracy_after"] > out["accuracy_before"] + 0.15  # 9.8 % -> 32.8 %, from scratch
    sram = out["sram"]
    assert 0 < sram["stack_high_water_bytes"] < sram["stack_reserved_bytes"]
    assert sram["planned_bytes"] <= sram["measured_bytes"] <= sram["planned_bytes"] + 16 * 1024

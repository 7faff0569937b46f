"""Speed of the int8 training step on the paper's own schemes, side by side with the paper.

For MobileNetV2-w0.35, ProxylessNAS-w0.3 and the MCUNet-like network of ``tvm_tinytrain.zoo``
(``--resolution``, default 128), quantized to int8 by ``zoo.quantize_qdq`` and loaded with an int8
classifier (``load_model(path, float_classifier=False)``), trained with SGD (lr 0.01, batch 1) on the
schemes of tiny-training's ``compilation/mcu_ir_gen.py`` (``../shared/docs/reference.md``):

- MobileNetV2 "99kb": biases of the last 25 layers; weights of layers 27, 30, 33, 36, 39 whole, 42 at
  1/8, 45 at 1/2, 48 whole;
- ProxylessNAS "98kb": biases of the last 25; weights 36 whole, 39 at 1/2, 42, 45 whole, 48 at 1/4,
  51 at 1/2, 54, 57 whole;
- MCUNet "99kb": biases of the last 22; weights 21, 24, 27, 30 whole, 36 at 1/8, 39 at 1/4.

Our layer numbering is the paper's (``tt.layer_table``: the stem conv is 0, then each inverted
bottleneck's expansion 1×1, depthwise and projection 1×1 in order); every weight these schemes name
is an expansion 1×1 conv (a 1×1 conv followed by a depthwise one), as in the paper, and the script
checks it before building. Our partial updates take the first channels, the paper's the largest.

Per network:

- instructions per training step and per ``predict`` on the emulated Cortex-M7 (``qemu_cortex_m7``,
  ``-icount shift=0``, the default ``-O2 -funroll-loops``), and ``predict``'s instructions per MAC
  (``zoo.count_macs``: every conv and the classifier). The paper's figures are milliseconds at
  216 MHz, turned into cycles; ours are instructions, not cycles (no pipeline, cache or wait states);
- SRAM planned (arena + trainable parameters + optimizer state + rollback copy) and measured on QEMU
  (static ``.data`` + ``.bss`` from the ELF plus the painted stack's high-water mark, as
  ``benchmarks/memory.py``'s ``measure_on_qemu``), against the paper's Fig. 10a;
- build time: ``tt.build(..., target="c")`` and ``target="llvm"`` (the TinyTrain pass apart), wall
  and this process's CPU seconds (on a shared machine the CPU figure is the idle machine's time);
- host step: median ms of ``HostTrainer.step`` (TVM llvm, one thread; wall and CPU) against
  PyTorch's float step with the same layers' tensors trainable (whole tensors;
  ``benchmarks/c_step.py``'s ``torch_step_ms``, one thread, wall), on the same sample dequantized;
- whether the first step's loss is the same float on QEMU and on the TVM host path, and on the
  profile build.

For MobileNetV2 (``--profile``), the per-kernel profile (``tvm_tinytrain.micro.profile``): the
instructions of each kernel family per step and per ``predict``.

    python benchmarks/speed.py [--networks mobilenet_v2,proxyless_nas,mcunet_like]
                               [--out speed.md] [--json speed.json] [--no-host] [--no-torch]
                               [--profile mobilenet_v2] [--steps 5]

The markdown goes to stdout (and ``--out``), progress to stderr. Each network takes minutes (the C
build of the step, then the llvm one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LR = 0.01
KB = 1024
LABEL = 1
TOP_FAMILIES = 15


@dataclass(frozen=True)
class Network:
    key: str
    label: str
    scheme: dict  # the paper's scheme, in our (the paper's) layer numbering
    paper_ms: float  # Fig. 10c: ms per training step on the board, sparse update (216 MHz)
    paper_kb: int  # Fig. 10a: peak SRAM, sparse update + reordering

    @property
    def paper_cycles(self) -> float:
        return self.paper_ms * 216e3


def _scheme(bias_last: int, weights: dict[int, float]) -> dict:
    return {"bias": {"last": bias_last}, "weights": {str(k): float(v) for k, v in weights.items()},
            "classifier": True}


NETWORKS = {n.key: n for n in [
    Network("mobilenet_v2", "MobileNetV2-w0.35",
            _scheme(25, {27: 1, 30: 1, 33: 1, 36: 1, 39: 1, 42: 0.125, 45: 0.5, 48: 1}), 373, 141),
    Network("proxyless_nas", "ProxylessNAS-w0.3",
            _scheme(25, {36: 1, 39: 0.5, 42: 1, 45: 1, 48: 0.25, 51: 0.5, 54: 1, 57: 1}), 443, 135),
    Network("mcunet_like", "MCUNet-like (5FPS)",
            _scheme(22, {21: 1, 24: 1, 27: 1, 30: 1, 36: 0.125, 39: 0.25}), 546, 173),
]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default=",".join(NETWORKS),
                        help=f"comma-separated subset of {','.join(NETWORKS)} (default all)")
    parser.add_argument("--profile", default="mobilenet_v2",
                        help="networks whose per-kernel profile to take (comma-separated; '' for none)")
    parser.add_argument("--resolution", type=int, default=128, help="input height and width (default 128)")
    parser.add_argument("--steps", type=int, default=5, help="timed host steps per path (default 5)")
    parser.add_argument("--chunk-bytes", type=int, default=16 * 1024,
                        help="TinyTrain's chunk_bytes: the bytes a banded chain's band tensors may take "
                             "(default 16384, TinyTrain's; larger bands recompute fewer halo rows and "
                             "take more SRAM)")
    parser.add_argument("--no-host", action="store_true", help="skip the llvm build and the host step times")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch's step")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--json", type=Path, help="write every figure as JSON here")
    parser.add_argument("--work", type=Path,
                        help="folder for the models and projects (default: a temporary one)")
    args = parser.parse_args(argv)
    args.networks = _names(parser, args.networks, "--networks")
    args.profile = _names(parser, args.profile, "--profile", allow_empty=True)
    if not args.networks:
        parser.error("--networks names no network")
    if args.resolution < 32:
        parser.error("--resolution must be at least 32")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.chunk_bytes < 1024:
        parser.error("--chunk-bytes must be at least 1024")
    return args


def _names(parser, text: str, option: str, allow_empty: bool = False) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(NETWORKS))
    if unknown:
        parser.error(f"{option}: unknown network(s) {', '.join(unknown)}; choose from {', '.join(NETWORKS)}")
    return names


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_scheme(layers: list, scheme: dict, label: str) -> None:
    """Raise unless every weight ``scheme`` names is an expansion 1×1 conv (followed by a depthwise
    conv), as in the paper's schemes."""
    for index in map(int, scheme["weights"]):
        if index + 1 >= len(layers):
            raise ValueError(f"{label}: the scheme names layer {index}; the network has {len(layers)} layers")
        layer, after = layers[index], layers[index + 1]
        if layer.kind != "conv" or tuple(layer.weight_shape[2:]) != (1, 1) or after.kind != "dwconv":
            raise ValueError(f"{label}: layer {index} is a {layer.kind} {layer.weight_shape} followed by a "
                             f"{after.kind}, not an expansion 1x1 conv: the numbering is not the paper's")


def _float_model(key: str, resolution: int):
    from tvm_tinytrain import zoo

    if key == "mobilenet_v2":
        return zoo.mobilenet_v2(width_mult=0.35, resolution=resolution)
    if key == "proxyless_nas":
        return zoo.proxyless_nas(width_mult=0.3, resolution=resolution)
    return zoo.mcunet_like(resolution=resolution)


def _qemu_project(artifact, folder: Path, options: dict | None = None):
    from tvm_tinytrain import micro

    planned = artifact.metadata["memory"]["planned_sram_bytes"]
    ram_kb = max(320, -(-planned // KB) + 64)
    project = micro.create_project(artifact, "qemu_cortex_m7", folder,
                                   {"ram_kb": str(ram_kb), "flash_kb": "4096", **(options or {})}, force=True)
    project.build()
    return project


def _qemu_run(project, x) -> dict:
    """One training step and one predict on the device: their instructions, the loss, the stack."""
    with project.session() as dev:
        loss = dev.train_step(x, LABEL)
        step = dev.last_cost
        dev.predict(x)
        predict = dev.last_cost
        high_water, _ = dev.stack()
    return {"loss": loss, "step": int(step), "predict": int(predict), "stack": high_water}


def run_network(net: Network, args, work: Path) -> dict:
    """Every figure of one network (see the module docstring)."""
    import numpy as np
    import onnx

    import tvm_tinytrain as tt
    from tvm_tinytrain import zoo
    from tvm_tinytrain.micro.profile import profile_options, read_profile
    from tvm_tinytrain.quantize import input_quantization

    row: dict = {"network": net.key, "label": net.label, "scheme": net.scheme,
                 "paper_cycles": net.paper_cycles, "paper_ms": net.paper_ms, "paper_kb": net.paper_kb}
    folder = work / net.key
    folder.mkdir(parents=True, exist_ok=True)
    model = _float_model(net.key, args.resolution)
    row["macs"] = zoo.count_macs(model)
    path = folder / "int8.onnx"
    onnx.save(zoo.quantize_qdq(model), path)
    mod, params = tt.load_model(str(path), float_classifier=False)
    layers = tt.layer_table(mod)
    check_scheme(layers, net.scheme, net.label)
    row["layers"] = len(layers)

    _say(f"{net.label}: TinyTrain pass ...")
    with _timed(row, "pass"):
        train_mod = tt.relay.transform.TinyTrain(net.scheme, optimizer=tt.SGD(lr=LR),
                                                 chunk_bytes=args.chunk_bytes)(mod)
    _say(f"{net.label}: pass {row['pass_s']:.0f} s; C build ...")
    with _timed(row, "build_c"):
        artifact = tt.build(train_mod, params, target="c")
    memory = artifact.metadata["memory"]
    row["memory"] = memory
    row["planned_sram_bytes"] = memory["planned_sram_bytes"]
    row["kernels"] = {f: len(k) for f, k in artifact.metadata["plan"].items()}

    x_param = train_mod["predict"].params[0]
    shape = [int(d) for d in x_param.ty.shape]
    x = np.random.default_rng(0).integers(-128, 128, shape).astype(str(x_param.ty.dtype))
    _say(f"{net.label}: C build {row['build_c_s']:.0f} s, {row['kernels']} kernels; QEMU ...")
    project = _qemu_project(artifact, folder / "qemu")
    static = project.static_ram()
    run = _qemu_run(project, x)
    row["qemu"] = {**run, "static": static}
    row["qemu_step_instructions"] = run["step"]
    row["qemu_predict_instructions"] = run["predict"]
    row["instructions_per_mac"] = run["predict"] / row["macs"]
    row["measured_sram_bytes"] = static["data"] + static["bss"] + run["stack"]

    if net.key in args.profile:
        _say(f"{net.label}: QEMU profile build ...")
        profiled = _qemu_project(artifact, folder / "qemu_profile", profile_options(artifact))
        prof_run = _qemu_run(profiled, x)
        profile = read_profile(profiled)
        row["profile"] = {
            "loss_equals_plain": np.float32(prof_run["loss"]).tobytes() == np.float32(run["loss"]).tobytes(),
            "step_instructions": prof_run["step"], "predict_instructions": prof_run["predict"],
            **{f: {"markdown": profile.markdown(f, top=TOP_FAMILIES),
                   "families": [vars(r) for r in profile.by_family(f)],
                   "kernels": [{**vars(k), "per_call": k.per_call} for k in profile.of(f)]}
               for f in ("train_step", "predict")},
        }

    if not args.no_host:
        _say(f"{net.label}: llvm build ...")
        with _timed(row, "build_llvm"):
            trainer = tt.build(train_mod, params, target="llvm")
        times, cpu, losses = [], [], []
        for _ in range(args.steps + 1):  # the first one warms up
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(trainer.step(x, LABEL))
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        row["host_step_ms"] = statistics.median(times[1:])
        row["host_step_cpu_ms"] = statistics.median(cpu[1:])
        row["host_loss"] = float(losses[0])
        row["loss_qemu_equals_llvm"] = np.float32(losses[0]).tobytes() == np.float32(run["loss"]).tobytes()
        if not args.no_torch:
            from benchmarks.c_step import torch_step_ms, trainable_layer_flags

            _say(f"{net.label}: PyTorch ...")
            scale, zero = input_quantization(mod)  # the same sample, dequantized
            x_float = (x.astype(np.float32) - zero) * np.float32(scale)
            flags = trainable_layer_flags(len(layers), net.scheme)
            row["torch_step_ms"] = torch_step_ms(model, flags, x_float, LABEL,
                                                 args.steps)
    return row


@contextmanager
def _timed(row: dict, name: str):
    """``row[name + "_s"]``: the wall seconds of the block; ``row[name + "_cpu_s"]``: this process's
    CPU seconds (what the block costs on an idle machine, when it runs on one thread)."""
    start, cpu = time.perf_counter(), time.process_time()
    yield
    row[f"{name}_s"] = time.perf_counter() - start
    row[f"{name}_cpu_s"] = time.process_time() - cpu


def _m(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} M"


def _kb(n: float | None) -> str:
    return "-" if n is None else f"{n / KB:,.1f} KB"


def _s(n: float | None, unit: str = "s", digits: int = 0) -> str:
    return "-" if n is None else f"{n:,.{digits}f} {unit}"


def _wall_cpu(row: dict, name: str, unit: str = "s", digits: int = 0) -> str:
    wall, cpu = row.get(f"{name}_{unit}"), row.get(f"{name}_cpu_{unit}")
    return "-" if wall is None else f"{_s(wall, unit, digits)} ({_s(cpu, unit, digits)})"


def markdown(rows: list[dict], args) -> str:
    bands = "" if args.chunk_bytes == 16 * 1024 else f", chunk_bytes {args.chunk_bytes}"
    lines = [f"# Speed of the int8 training step ({args.resolution}×{args.resolution}, the paper's schemes, "
             f"int8 classifier, SGD, batch 1{bands})", "",
             "| network | MACs | instructions per step (QEMU) | paper: cycles per step | per predict | "
             "per MAC (predict) | SRAM planned | measured | paper | build C | build llvm | "
             "host step, TVM llvm | PyTorch float | loss QEMU = llvm |",
             "| --- |" + " ---: |" * 12 + " :---: |"]
    for r in rows:
        equal = r.get("loss_qemu_equals_llvm")
        lines.append(
            f"| {r['label']} | {_m(r['macs'])} | {_m(r['qemu_step_instructions'])} | "
            f"{_m(r['paper_cycles'])} ({r['paper_ms']:.0f} ms) | {_m(r['qemu_predict_instructions'])} | "
            f"{r['instructions_per_mac']:.1f} | {_kb(r['planned_sram_bytes'])} | "
            f"{_kb(r['measured_sram_bytes'])} | "
            f"{r['paper_kb']} KB | {_wall_cpu(r, 'build_c')} | {_wall_cpu(r, 'build_llvm')} | "
            f"{_wall_cpu(r, 'host_step', 'ms', 1)} | {_s(r.get('torch_step_ms'), 'ms', 1)} | "
            f"{'-' if equal is None else 'yes' if equal else 'NO'} |")
    lines += ["", "Instructions on the emulated Cortex-M7 (`-icount shift=0`), not cycles; the paper's "
              "cycles are its ms at 216 MHz (Fig. 10c), its SRAM Fig. 10a. TinyEngine's inference: "
              "≈ 2 cycles per MAC. Kernels per step / predict: " + "; ".join(
                  f"{r['label']} {r['kernels']['train_step']} / {r['kernels']['predict']}" for r in rows)
              + ". TinyTrain pass: " + ", ".join(f"{r['label']} {_wall_cpu(r, 'pass')}" for r in rows)
              + ". Times: wall (this process's CPU); the CPU figure is what an idle machine takes."]
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            lines += ["", f"## Per-kernel profile: {r['label']} (QEMU, instructions per call)", "",
                      f"Profile build: step {_m(p['step_instructions'])}, predict "
                      f"{_m(p['predict_instructions'])} (the marks add "
                      f"{p['step_instructions'] - r['qemu_step_instructions']:,} and "
                      f"{p['predict_instructions'] - r['qemu_predict_instructions']:,}); its loss equals "
                      f"the plain build's: {'yes' if p['loss_equals_plain'] else 'NO'}.", "",
                      p["train_step"]["markdown"], "", p["predict"]["markdown"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = "1"  # the host step on one thread, before TVM starts its pool
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    work = args.work or Path(tempfile.mkdtemp(prefix="tinytrain-speed-"))
    rows = []
    for key in args.networks:
        start = time.perf_counter()
        rows.append(run_network(NETWORKS[key], args, work))
        _say(f"{NETWORKS[key].label}: done in {time.perf_counter() - start:.0f} s")
        if args.json:  # after each network: a long run leaves what it measured
            args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    text = markdown(rows, args)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

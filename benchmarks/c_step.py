"""The C training step of MobileNetV2-w0.35 (128×128, float, a paper-style sparse scheme):
host C vs TVM's llvm build vs PyTorch, and the emulated Cortex-M7 (QEMU).

In one run, from the same weights, input and label:

- TVM llvm: ``tvm_tinytrain.build(..., target="llvm")``, median ms of ``trainer.step``;
- host C: the artifact built by the ``host`` template (-O2), the median of the step time
  the program measures around ``tinytrain_train_step`` (µs, without the pipe transfer);
- PyTorch: the twin of the ONNX model (``benchmarks/torch_twin.py``) with the same
  parameters trainable (whole tensors: PyTorch has no partial-channel update);
- QEMU: the ``qemu_cortex_m7`` template under ``-icount shift=0``: instructions per step,
  the SRAM measured (static .data + .bss from the ELF, plus the painted stack's high-water
  mark) against the plan (arena + trainable parameters + optimizer state).

A float32 MobileNetV2 needs more than the STM32F746's 320 KB of SRAM and 1 MB of flash, so
the QEMU build here uses the mps2-an500's larger memories (``--ram-kb``, ``--flash-kb``);
int8 (issue 5) is what fits the board.

    python benchmarks/c_step.py [--steps 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
LR = 0.01


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (default 5)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--width", type=float, default=0.35)
    parser.add_argument("--ram-kb", type=int, default=1024, help="QEMU RAM region (default 1024)")
    parser.add_argument("--flash-kb", type=int, default=4096, help="QEMU flash region (default 4096)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def trainable_layer_flags(num_layers: int, scheme: dict) -> dict[int, tuple[bool, bool]]:
    """Layer index → (weight trainable, bias trainable) of a ``{"bias": {"last": k}, "weights":
    {...}, "classifier": ...}`` scheme, for :func:`torch_step_ms`."""
    flags = {}
    for index in range(num_layers):
        bias = index >= num_layers - scheme["bias"]["last"]
        last = index == num_layers - 1
        weight = str(index) in scheme["weights"] or bool(scheme.get("classifier") and last)
        if bias or weight:
            flags[index] = (weight, bias)
    return flags


def torch_step_ms(model, trainable_layers: dict[int, tuple[bool, bool]], x, y, steps: int) -> float | None:
    """Median ms of a PyTorch step with the scheme's tensors trainable (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    from benchmarks.torch_twin import torch_module_from_onnx

    torch.set_num_threads(1)
    net = torch_module_from_onnx(model).train()
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(False)
    chosen = []
    for layer, (weight, bias) in trainable_layers.items():
        for flag, p in ((weight, params[2 * layer]), (bias, params[2 * layer + 1])):
            if flag:
                p.requires_grad_(True)
                chosen.append(p)
    opt = torch.optim.SGD(chosen, lr=LR)
    inputs, label = torch.from_numpy(x), torch.tensor([y])
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(inputs), label).backward()
        opt.step()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import numpy as np
    import onnx

    import tvm_tinytrain as tt
    from benchmarks.memory import paper_style_scheme
    from tvm_tinytrain import micro, zoo

    model = zoo.mobilenet_v2(width_mult=args.width, resolution=args.resolution, num_classes=NUM_CLASSES)
    work = Path(tempfile.mkdtemp(prefix="tinytrain-c-step-"))
    onnx.save(model, work / "mbv2.onnx")
    mod, params = tt.load_model(work / "mbv2.onnx")
    layers = tt.layer_table(mod)
    scheme = paper_style_scheme(layers)
    train_mod = tt.relay.transform.TinyTrain(scheme, optimizer=tt.SGD(lr=LR))(mod)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 3, args.resolution, args.resolution)).astype(np.float32)
    y = int(rng.integers(NUM_CLASSES))
    result: dict = {"model": f"MobileNetV2-w{args.width} {args.resolution}x{args.resolution} float32",
                    "scheme": scheme}

    _say("TVM llvm: compiling ...")
    start = time.perf_counter()
    trainer = tt.build(train_mod, params, target="llvm")
    result["tvm_compile_s"] = time.perf_counter() - start
    losses, times = [], []
    for _ in range(args.steps + 2):
        t0 = time.perf_counter()
        losses.append(trainer.step(x, y))
        times.append((time.perf_counter() - t0) * 1e3)
    result["tvm_llvm_ms"] = statistics.median(times[2:])
    result["tvm_losses"] = losses

    _say("C: generating the artifact ...")
    start = time.perf_counter()
    artifact = tt.build(train_mod, params, target="c")
    result["c_generate_s"] = time.perf_counter() - start
    result["memory"] = artifact.metadata["memory"]
    host = micro.create_project(artifact, "host", work / "host")
    _say("host C: compiling ...")
    start = time.perf_counter()
    host.build()
    result["host_c_compile_s"] = time.perf_counter() - start
    with host.session() as dev:
        c_losses, costs = [], []
        for _ in range(args.steps + 2):
            c_losses.append(dev.train_step(x, y))
            costs.append(dev.last_cost / 1e6)  # ns -> ms
    result["host_c_ms"] = statistics.median(costs[2:])
    result["host_c_losses"] = c_losses
    c_arr, t_arr = np.array(c_losses), np.array(losses)  # relative, floored at 1e-3 (losses reach 0)
    result["host_c_vs_tvm_max_rel_loss_diff"] = float(
        np.max(np.abs(c_arr - t_arr) / np.maximum(np.abs(t_arr), 1e-3)))

    if not args.no_torch:
        flags = trainable_layer_flags(len(layers), scheme)
        _say("PyTorch ...")
        result["pytorch_ms"] = torch_step_ms(model, flags, x, y, args.steps)

    if not args.no_qemu:
        qemu = micro.create_project(artifact, "qemu_cortex_m7", work / "qemu",
                                    {"ram_kb": args.ram_kb, "flash_kb": args.flash_kb})
        _say("QEMU: cross-compiling ...")
        qemu.build()
        static = qemu.static_ram()
        with qemu.session() as dev:
            q_losses, instructions = [], []
            for _ in range(min(args.steps, 3)):
                q_losses.append(dev.train_step(x, y))
                instructions.append(dev.last_cost)
            used, reserved = dev.stack()
        planned = artifact.metadata["memory"]["planned_sram_bytes"]
        measured = static["data"] + static["bss"] + used
        result["qemu"] = {
            "instructions_per_step": statistics.median(instructions),
            "losses": q_losses,
            "equals_host_c_bitwise": [np.float32(a).tobytes() == np.float32(b).tobytes()
                                      for a, b in zip(q_losses, c_losses)],
            "static": static, "stack_used": used, "stack_reserved": reserved,
            "planned_sram_bytes": planned, "measured_sram_bytes": measured,
            "measured_minus_planned": measured - planned,
        }

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    kb = lambda n: f"{n / 1024:,.1f} KB"  # noqa: E731
    print(f"{result['model']}, sparse scheme {json.dumps(scheme)}, SGD, batch 1, 1 thread\n")
    print("| path | compile s | median ms/step |\n| --- | ---: | ---: |")
    print(f"| TVM llvm (HostTrainer) | {result['tvm_compile_s']:.1f} | {result['tvm_llvm_ms']:.2f} |")
    print(f"| host C (-O2, gcc) | {result['c_generate_s'] + result['host_c_compile_s']:.1f} | "
          f"{result['host_c_ms']:.2f} |")
    if result.get("pytorch_ms") is not None:
        print(f"| PyTorch (same tensors trainable) | - | {result['pytorch_ms']:.2f} |")
    print(f"\nhost C vs TVM losses: max relative difference {result['host_c_vs_tvm_max_rel_loss_diff']:.2e}")
    if "qemu" in result:
        q = result["qemu"]
        print(f"\nQEMU Cortex-M7: {q['instructions_per_step']:,.0f} instructions per train step; "
              f"losses equal host C bit for bit: {all(q['equals_host_c_bitwise'])}")
        print(f"SRAM planned {kb(q['planned_sram_bytes'])} (arena {kb(result['memory']['arena_bytes'])}), "
              f"measured {kb(q['measured_sram_bytes'])} "
              f"(.data+.bss {kb(q['static']['data'] + q['static']['bss'])}"
              f", stack high-water {kb(q['stack_used'])}): {q['measured_minus_planned']:+,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

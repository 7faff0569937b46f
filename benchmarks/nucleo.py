"""On-device training on a board (a NUCLEO on a serial port) or, without one, the emulated Cortex-M7.

The whole device flow, as a client of the library: compile a model's training step to C (or take an
artifact), make the project (``zephyr`` for ``--board`` with ``--serial-port``, ``qemu_cortex_m7``
otherwise), build, flash, and train with :func:`tvm_tinytrain.run.run`: the data set streamed over
the framed protocol, accuracy before / after on held-out samples, the device's cost per step
(cycles from DWT on a board, instructions on QEMU), and SRAM: the plan against what the program
holds (``.data`` + ``.bss`` from the linker) plus the stack's high-water mark read from the device.

Default data: scikit-learn's handwritten digits (``load_digits``: 8×8, 10 classes, 70 / 30 split),
for a model with an 8×8 one-channel input; ``--data`` / ``--eval`` take ``.npz`` files (``x``,
``y``) in the model file's own layout, or folders of one sub-folder of images per class (read by
:func:`tvm_tinytrain.data.load_data`, as ``tinytrain run`` reads them). Default model:
``zoo.small_cnn`` for the digits, untrained, its full training step under a 256 KB budget.

    python benchmarks/nucleo.py [--json]                                          QEMU, ~1 min
    python benchmarks/nucleo.py --serial-port /dev/ttyACM0 --board nucleo_f746zg  a board (Zephyr)
    python benchmarks/nucleo.py --model m.tflite --scheme last-k:2 --data d.npz --eval t.npz
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import tvm_tinytrain as tt
from tvm_tinytrain import micro, zoo
from tvm_tinytrain.codegen import Artifact
from tvm_tinytrain.errors import TinyTrainError
from tvm_tinytrain.run import run

BOARD_TEMPLATE, QEMU_TEMPLATE = "zephyr", "qemu_cortex_m7"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def digits(seed: int = 0):
    """((x_train, y_train), (x_test, y_test)): the 1,797 digits, x (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target.astype(np.int64), test_size=0.3,
                                              random_state=seed, stratify=data.target)
    return (x_tr, y_tr), (x_te, y_te)


def compile_artifact(args, work: Path) -> Artifact:
    """The training step as C: ``--artifact`` as it is, else ``--model`` (or the digits CNN) compiled."""
    if args.artifact:
        return Artifact.load(args.artifact)
    model = args.model
    if model is None:
        model = work / "digits_cnn.onnx"
        onnx.save(zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=8, seed=args.seed), model)
    mod, params = tt.load_model(model)
    optimizer = tt.SGD(lr=args.lr, momentum=args.momentum)
    train_mod = tt.relay.transform.TinyTrain(args.scheme, loss="cross_entropy", optimizer=optimizer)(mod)
    return tt.build(train_mod, params, target="c", budget=args.budget)


def data_sets(args, metadata: dict):
    """(train, eval) as (x, y) pairs, or .npz / image-folder paths, for :func:`run` (which reads and
    checks them)."""
    if args.data:
        return args.data, args.eval
    shape = tuple(metadata["input"]["shape"])
    if int(np.prod(shape)) != 64 or metadata["output"]["shape"][-1] < 10:
        raise TinyTrainError(f"the model takes {shape} with {metadata['output']['shape'][-1]} classes; the "
                             "default digits are 8x8 with 10 classes: give --data (and --eval) .npz files or "
                             "image folders")
    (x_tr, y_tr), (x_te, y_te) = digits(args.seed)
    x_tr, y_tr = x_tr[:args.limit], y_tr[:args.limit]
    sample = shape[1:] if shape[0] == 1 else shape  # one channel: NCHW and NHWC hold the same bytes
    return (x_tr.reshape(len(x_tr), *sample), y_tr), (x_te.reshape(len(x_te), *sample), y_te)


@contextlib.contextmanager
def _stack_probe(project: micro.Project, seen: dict):
    """While active, each session of ``project`` reads the device's stack high-water mark just
    before it closes (into ``seen["stack"]``): the deepest the whole run went."""
    opened = project.session

    @contextlib.contextmanager
    def session(*args, **kwargs):
        with opened(*args, **kwargs) as dev:
            yield dev
            seen["stack"] = dev.stack()

    project.session = session
    try:
        yield
    finally:
        project.session = opened


def benchmark(args, work: Path) -> dict:
    t0 = time.perf_counter()
    artifact = compile_artifact(args, work)
    compile_s = time.perf_counter() - t0
    train, evalset = data_sets(args, artifact.metadata)
    on_board = args.serial_port is not None
    template = BOARD_TEMPLATE if on_board else QEMU_TEMPLATE
    project_dir = Path(args.project_dir) if args.project_dir else work / template
    _say(f"project: {template}{' for ' + args.board if on_board else ''} in {project_dir}")
    project = micro.create_project(artifact, template, project_dir, board=args.board if on_board else None,
                                   force=args.project_dir is not None)
    _say("building ...")
    project.build()
    _say("flashing ..." if on_board else "checking the program and QEMU ...")
    project.flash(serial_port=args.serial_port)
    seen: dict = {}
    with _stack_probe(project, seen):
        result = run(project, train, evalset, epochs=args.epochs, serial_port=args.serial_port,
                     timeout=args.timeout, seed=args.seed, progress=not args.json, log=_say)
    memory = artifact.metadata["memory"]
    static = project.static_ram()
    stack_used, stack_reserved = seen.get("stack", (0, 0))
    return {
        "device": args.board if on_board else "qemu_cortex_m7 (qemu-system-arm -M mps2-an500, Cortex-M7)",
        "serial_port": args.serial_port,
        "template": template,
        "compile_seconds": round(compile_s, 2),
        "scheme": artifact.metadata.get("scheme") or (None if args.artifact else args.scheme),
        "epochs": result.epochs,
        "steps": result.steps,
        "mean_loss": result.mean_loss,
        "eval_samples": result.eval_samples,
        "accuracy_before": result.accuracy_before,
        "accuracy_after": result.accuracy_after,
        "cost_per_step": result.cost_per_step,
        "cost_unit": result.cost_unit,
        "sram": {
            "planned_bytes": memory["planned_sram_bytes"],
            "arena_bytes": memory["arena_bytes"],
            "measured_bytes": static["data"] + static["bss"] + stack_used,
            "static_data_bytes": static["data"],
            "static_bss_bytes": static["bss"],
            "stack_high_water_bytes": stack_used,
            "stack_reserved_bytes": stack_reserved,
        },
        "boot": result.boot,
        "saves": result.saves,
    }


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


def report(r: dict) -> str:
    cost = "n/a" if r["cost_per_step"] is None else f"{r['cost_per_step']:,.0f} {r['cost_unit']}"
    sram = r["sram"]
    acc = (f"{r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%}" if r["accuracy_after"] is not None
           else "n/a")
    return "\n".join([
        f"device:        {r['device']}" + (f" on {r['serial_port']}" if r["serial_port"] else ""),
        f"accuracy:      {acc} ({r['eval_samples']} held-out samples), {r['epochs']} epochs, "
        f"{r['steps']} steps, mean loss per epoch {', '.join(f'{v:.3f}' for v in r['mean_loss'])}",
        f"cost per step: {cost} (median)",
        f"SRAM:          planned {_kb(sram['planned_bytes'])} (arena {_kb(sram['arena_bytes'])}); measured "
        f"{_kb(sram['measured_bytes'])} = .data {_kb(sram['static_data_bytes'])} + .bss "
        f"{_kb(sram['static_bss_bytes'])} + stack high-water {_kb(sram['stack_high_water_bytes'])} "
        f"(of {_kb(sram['stack_reserved_bytes'])} reserved)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serial-port", help="the board's serial port (e.g. /dev/ttyACM0); without it, QEMU")
    p.add_argument("--board", default="nucleo_f746zg",
                   help="the zephyr template's board, with --serial-port (default nucleo_f746zg)")
    p.add_argument("--artifact", help="a compiled artifact (folder or .tar) instead of compiling a model")
    p.add_argument("--model", help="a .tflite / .onnx model (default: a small CNN for the digits)")
    p.add_argument("--scheme", default="full", help="which parameters learn (default full)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--budget", default="256KB", help="SRAM budget of the compiled step (default 256KB)")
    p.add_argument("--data", help=".npz with x and y, or a folder of one sub-folder of images per class, to "
                                  "train on (default: the digits' training split)")
    p.add_argument("--eval", help="data to evaluate on, the same formats (with --data)")
    p.add_argument("--epochs", type=int, default=2, help="epochs over the training data (default 2)")
    p.add_argument("--limit", type=int, help="train on the first N samples of the digits' training split")
    p.add_argument("--project-dir", help="where to make the project (replaced if it is one; default: a "
                                         "temporary folder)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each answer (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.eval and not args.data:
        p.error("--eval needs --data")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = benchmark(args, Path(tmp))
    except TinyTrainError as err:
        print(f"nucleo.py: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

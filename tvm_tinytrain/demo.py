"""``tinytrain demo``: the whole story, from a float model to a device that learned, in two minutes.

1. Pretrain a small CNN (``zoo.small_cnn``, built as ONNX and imported like any user model) on the
   digits 0–4 of scikit-learn's ``load_digits`` on the host (TVM, float32, every layer).
2. Quantize it to an int8 ``.tflite`` file (``ptq``: calibrated on the training images).
3. Compile a sparse training step of the int8 model as C under a 64 KB SRAM budget.
4. Create and build the ``host`` project (or ``qemu_cortex_m7``, asked for).
5. Fine-tune it on the device on the digits 5–9 (``run``: held-out accuracy before and after, the
   device's cost per step, a save after each epoch).
6. Export what it learned into a copy of the int8 file (``export_tuned``).

Everything lands in one folder (``./tinytrain-demo`` unless named), written whole at the end: the
int8 model, the project (``tinytrain run DEMO/project --data DEMO/digits_5-9_train.npz`` goes on
training it), the data, the exported model. An existing folder is replaced only when a demo made it.
With no C compiler on the machine, steps 4–5 run on TVM's host build (``HostTrainer``) instead,
and the demo says so.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from relay_passes import SGD

from . import files, zoo
from .errors import InputError
from .frontend import load_model
from .quantize import quantize_input
from .relay.transform import TinyTrain
from .trainer import build

MARKER = ".tinytrain-demo"  # in every folder the demo made: its result, as JSON
TARGETS = ("host", "qemu_cortex_m7")
BUDGET = "64KB"
# The device step, picked by measured accuracy on held-out digits 5-9 (TVM host build of the int8 step,
# seeds 0-4, 3 epochs, lr 0.1 cosine): the biases of all five layers, the weights of the depthwise and
# pointwise convs (layers 2, 3) and the float classifier: 94-97 % (min 94.1 %). last-k:2 reached
# 77-93 %, last-k:3 82-94 %, bias-only 58-86 %, the classifier alone 55-81 %; every layer, 95-98 %.
SCHEME = {"bias": {"last": 5}, "weights": {"2": 1.0, "3": 1.0}, "classifier": True}
FINETUNE_LR = 0.1
FINETUNE_EPOCHS = 3
LR_SCHEDULE = "cosine"  # the paper's decay over the fine-tuning run
CALIBRATION_SAMPLES = 300
WIDTH = 16  # zoo.small_cnn channels: 16, 32, 32, 32


@dataclass
class DemoResult:
    pretrain_accuracy: float             # float model, digits 0-4 held out
    int8_accuracy: float                 # the int8 model as the device runs it, digits 0-4 held out
    before_accuracy: float               # digits 5-9 held out, before fine-tuning
    after_accuracy: float                # digits 5-9 held out, after fine-tuning
    finetune_steps: int
    finetune_epochs: int
    scheme: str                          # a preset or the scheme's JSON
    learning_rate: float                 # the device's starting rate
    lr_schedule: str                     # "cosine" (decays to 0 over the run) or "constant"
    target: str                          # "host", "qemu_cortex_m7", or "tvm" (no C compiler)
    planned_sram_bytes: int              # the artifact's plan: arena + trainable + optimizer state
    flash_bytes: int
    measured_sram_bytes: int | None      # QEMU: static RAM + stack used; None where not measurable
    measured_sram_note: str
    cost_per_step: float | None
    cost_unit: str                       # "ns" (host program, TVM), "instructions" (QEMU)
    median_step_ms: float | None         # cost per step in ms when the unit is time
    compile_seconds: float               # the C step: TinyTrain + build(target="c")
    seconds: float                       # the whole demo
    folder: str
    project: str | None
    int8_model: str
    exported_model: str | None
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """What ``tinytrain demo`` prints after the run."""
        cost = "not measured" if self.cost_per_step is None else _cost(self.cost_per_step, self.cost_unit)
        measured = self.measured_sram_note if self.measured_sram_bytes is None else \
            f"{self.measured_sram_bytes:,} B ({self.measured_sram_note})"
        lines = [
            f"digits 0-4: float model {self.pretrain_accuracy:.1%}, int8 model {self.int8_accuracy:.1%}",
            f"digits 5-9 accuracy before fine-tuning: {self.before_accuracy:.1%}",
            f"digits 5-9 accuracy after fine-tuning:  {self.after_accuracy:.1%} "
            f"({self.finetune_steps} steps on {self.target}, lr {self.learning_rate:g} {self.lr_schedule})",
            f"trained on the device: {self.scheme}",
            f"SRAM planned: {self.planned_sram_bytes:,} B (budget {BUDGET}); measured: {measured}",
            f"cost per step: {cost}",
            f"project: {self.project}" + (" (not built: no C compiler)" if self.target == "tvm" else ""),
            f"exported model: {self.exported_model or 'not written'}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _text(scheme: str | dict) -> str:
    return scheme if isinstance(scheme, str) else json.dumps(scheme)


def _ms(cost: float | None, unit: str) -> float | None:
    return cost / 1e6 if cost is not None and unit == "ns" else None


def _cost(value: float, unit: str) -> str:
    if unit == "ns":
        return f"{value / 1e3:,.1f} µs"
    return f"{value:,.0f} {unit}"


def digit_splits(seed: int = 0):
    """(train, test) pairs of (x, y) for digits 0–4 and 5–9; x is (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    splits = []
    for low in (y < 5, y >= 5):
        splits.append(train_test_split(x[low], y[low], test_size=0.3, random_state=seed,
                                       stratify=y[low]))
    return splits


def float_cnn(seed: int = 0, width: int = WIDTH) -> onnx.ModelProto:
    """The demo's float CNN: ``zoo.small_cnn`` for 8×8 digits, its stride-2 conv padded as TFLite's
    SAME pads it (after, not before: (0, 0, 1, 1)), so the int8 file computes what was trained."""
    model = zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=width, seed=seed)
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and list(attrs["strides"].ints) == [2, 2]:
            del attrs["pads"].ints[:]
            attrs["pads"].ints.extend([0, 0, 1, 1])
    return model


def is_demo_folder(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _check_target(target: str) -> None:
    from . import micro

    if target not in TARGETS:
        raise InputError(f"unknown demo target {target!r}; choose one of {', '.join(TARGETS)}")
    if target != "host":  # asked for: its tools must be there (the host falls back to TVM)
        micro.check_tools(json.loads((micro.TEMPLATES / target / "template.json").read_text()))


def _no_compiler() -> str | None:
    """Why the host project cannot be built here, or None."""
    missing = [tool for tool in ("cc", "make") if shutil.which(tool) is None]
    return f"no {' or '.join(missing)} on this machine" if missing else None


def _bar(total: int, desc: str, show: bool):
    return tqdm(total=total, desc=desc, disable=not show, unit="step", leave=False)


def pretrain(seed: int, epochs: int, lr: float, data, show: bool = False, log=lambda _line: None,
             width: int = WIDTH):
    """Step 1: ``float_cnn(seed)`` trained on ``data`` = (x_train, x_test, y_train, y_test) with SGD
    (momentum 0.9); (its HostTrainer, its accuracy on the test part)."""
    xa_tr, xa_te, ya_tr, ya_te = data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits_cnn.onnx"
        onnx.save(float_cnn(seed, width), path)
        mod, params = load_model(path)
    log(f"1/6 pretraining a float CNN on digits 0-4 ({len(ya_tr)} samples, {epochs} epochs, host)")
    trainer = build(TinyTrain(scheme="full", optimizer=SGD(lr=lr, momentum=0.9))(mod), params)
    with _bar(epochs * len(ya_tr), "pretrain", show) as bar:
        def progress(done: int, total: int, loss: float) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        trainer.fit(xa_tr, ya_tr, epochs=epochs, seed=seed, progress=progress)
    accuracy = trainer.evaluate(xa_te, ya_te)
    log(f"    float model on held-out digits 0-4: {accuracy:.1%}")
    return trainer, accuracy


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def run_demo(pretrain_epochs: int = 5, finetune_epochs: int = FINETUNE_EPOCHS, lr: float = 0.005,
             seed: int = 0, show_progress: bool = True, log: Callable[[str], None] = print, *,
             output: str | Path = "tinytrain-demo", target: str = "host", finetune_lr: float = FINETUNE_LR,
             scheme: str | dict = SCHEME, lr_schedule: str = LR_SCHEDULE) -> DemoResult:
    """Run the demo (module docstring) into the folder ``output``; ``lr`` is the pretraining rate
    (SGD, momentum 0.9), ``finetune_lr`` the device's (plain SGD). Errors before any work: a bad
    target or missing tool for it, an ``output`` that exists and is not a demo folder."""
    from .ptq import quantize_tflite

    laps = _Laps()
    _check_target(target)
    for name, value in (("pretrain_epochs", pretrain_epochs), ("finetune_epochs", finetune_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, not {value!r}")
    output = files.check_folder(output, is_demo_folder, "tinytrain demo folder")
    no_cc = _no_compiler() if target == "host" else None
    (xa_tr, xa_te, ya_tr, ya_te), (xb_tr, xb_te, yb_tr, yb_te) = digit_splits(seed)
    notes: list[str] = []

    with files.replacing_folder(output, is_demo_folder, "tinytrain demo folder") as tmp:
        float_trainer, pretrain_acc = pretrain(seed, pretrain_epochs, lr, (xa_tr, xa_te, ya_tr, ya_te),
                                               show_progress, log)
        laps("pretrain")

        log(f"2/6 quantizing it to int8 ({CALIBRATION_SAMPLES} calibration images)")
        int8_path = quantize_tflite(float_trainer, xa_tr[:CALIBRATION_SAMPLES], tmp / "digits_int8.tflite")
        mod, params = load_model(int8_path)
        xa_te_q, xb_tr_q, xb_te_q = (quantize_input(mod, _nhwc(x)) for x in (xa_te, xb_tr, xb_te))
        np.savez(tmp / "digits_5-9_train.npz", x=_nhwc(xb_tr), y=yb_tr)
        np.savez(tmp / "digits_5-9_test.npz", x=_nhwc(xb_te), y=yb_te)
        laps("quantize")

        log(f"3/6 compiling the int8 training step (scheme {_text(scheme)}) as C under {BUDGET}")
        train_mod = TinyTrain(scheme=scheme, loss="cross_entropy", optimizer=SGD(lr=finetune_lr))(mod)
        artifact = build(train_mod, params, target="c", budget=BUDGET, model=str(int8_path))
        memory = artifact.metadata["memory"]
        log(f"    planned SRAM {memory['planned_sram_bytes']:,} B, flash {memory['flash_bytes']:,} B")
        laps("compile")

        from . import micro

        project = micro.create_project(artifact, target, tmp / "project")
        data = ((xa_te_q, ya_te), (xb_tr_q, yb_tr), (xb_te_q, yb_te))
        how = {"epochs": finetune_epochs, "schedule": lr_schedule, "seed": seed, "show": show_progress,
               "log": log}
        if no_cc:
            notes.append(f"{no_cc}: the project was made but not built; the fine-tuning ran on TVM's "
                         "host build (HostTrainer) instead of the C program")
            log(f"4/6 {notes[-1]}")
            device = _finetune_tvm(train_mod, params, *data, **how)
        else:
            log(f"4/6 building the {target} project")
            project.build()
            laps("build")
            device = _finetune_device(project, *data, **how)
        laps("fine-tune")

        log("6/6 exporting what it learned to .tflite")
        exported = _export(project.path, tmp / "digits_tuned.tflite", device.pop("params", None), xb_tr_q,
                           notes, log)
        laps("export")
        unit = device.pop("unit")
        result = DemoResult(
            pretrain_accuracy=pretrain_acc, **device, finetune_epochs=finetune_epochs, scheme=_text(scheme),
            learning_rate=finetune_lr, lr_schedule=lr_schedule, target="tvm" if no_cc else target,
            planned_sram_bytes=int(memory["planned_sram_bytes"]), flash_bytes=int(memory["flash_bytes"]),
            cost_unit=unit, median_step_ms=_ms(device["cost_per_step"], unit),
            compile_seconds=laps.laps["compile"], seconds=0.0, folder=str(output),
            project=str(output / "project"), int8_model=str(output / "digits_int8.tflite"),
            exported_model=str(output / "digits_tuned.tflite") if exported else None, notes=notes,
            stage_seconds=laps.laps)
        result.seconds = laps.total()
        (tmp / MARKER).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return result


class _Laps:
    """Seconds per stage of the demo."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 2)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def _finetune_device(project, digits_0_4, train, test, epochs: int, schedule: str, seed: int, show: bool,
                     log) -> dict:
    """Steps 4-5 on the device program: the int8 model's accuracy on 0-4 and the stack a step takes
    (one probe step, then the compiled-in weights back), then ``run`` on 5-9."""
    from .run import evaluate, run

    with project.session() as dev:
        int8_acc = evaluate(dev, _dataset(digits_0_4), "cross_entropy", progress=show)
        dev.train_step(train[0][0], train[1][0])
        stack_used, _ = dev.stack()
        dev.reset()
    log(f"    int8 model on the device, held-out digits 0-4: {int8_acc:.1%}")
    sram, note = None, "not measurable on the host: a host process has no fixed memory map"
    if project.template.get("size_tool"):
        ram = project.static_ram()
        sram = ram["data"] + ram["bss"] + stack_used
        note = f"static RAM {ram['data'] + ram['bss']:,} B (.data + .bss) + stack {stack_used:,} B"
    log(f"5/6 fine-tuning on the device on digits 5-9 ({len(train[1])} samples, {epochs} epochs)")
    result = run(project, train, test, epochs=epochs, seed=seed, progress=show, lr_schedule=schedule,
                 log=lambda line: log(f"    {line}"))
    if result.interrupted:  # Ctrl-C: run stopped after a step and saved; the demo stops whole
        raise KeyboardInterrupt
    return {"int8_accuracy": int8_acc, "before_accuracy": result.accuracy_before,
            "after_accuracy": result.accuracy_after, "finetune_steps": result.steps,
            "cost_per_step": result.cost_per_step, "unit": result.cost_unit,
            "measured_sram_bytes": sram, "measured_sram_note": note}


def _dataset(pair):
    from .data import Dataset

    return Dataset(pair[0], pair[1], "digits")


def _finetune_tvm(train_mod, params, digits_0_4, train, test, epochs: int, schedule: str, seed: int,
                  show: bool, log) -> dict:
    """Steps 4-5 on TVM's host build of the same training step (no C compiler)."""
    trainer = build(train_mod, params)
    int8_acc = trainer.evaluate(*digits_0_4)
    log(f"    int8 model (TVM host build), held-out digits 0-4: {int8_acc:.1%}")
    before = trainer.evaluate(*test)
    log(f"5/6 fine-tuning on TVM's host build on digits 5-9 ({len(train[1])} samples, {epochs} epochs)")
    times: list[int] = []
    with _bar(epochs * len(train[1]), "fine-tune", show) as bar:
        clock = time.perf_counter_ns()

        def progress(done: int, total: int, loss: float) -> None:  # after each step
            nonlocal clock
            now = time.perf_counter_ns()
            times.append(now - clock)
            clock = now
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        trainer.fit(*train, epochs=epochs, seed=seed, progress=progress, lr_schedule=schedule)
    after = trainer.evaluate(*test)
    log(f"    accuracy before {before:.1%}, after {after:.1%}")
    return {"int8_accuracy": int8_acc, "before_accuracy": before, "after_accuracy": after,
            "finetune_steps": len(times), "cost_per_step": float(statistics.median(times)), "unit": "ns",
            "params": trainer.params(), "measured_sram_bytes": None,
            "measured_sram_note": "not measurable: the step ran on TVM's host build, not as the C program"}


def _export(project_dir: Path, output: Path, params, samples: np.ndarray, notes: list[str], log) -> bool:
    """Step 6: the int8 file with what the device (or the TVM trainer: ``params``) learned; the
    requantized classifier's output range calibrated on ``samples``."""
    import importlib.util

    from .export_tuned import export_project

    if importlib.util.find_spec("ai_edge_litert") is None:  # an extra: tvm-tinytrain[verify]
        samples = None
        notes.append("classifier output range from a bound that never clips (pip install ai-edge-litert "
                     "calibrates it on the eval samples)")
        log(f"    {notes[-1]}")
    report = export_project(project_dir, output, params=params, samples=samples)
    extra = f" ({'; '.join(report.notes)})" if report.notes else ""
    log(f"    {len(report.tensors)} tensors written back{extra}")
    return True

"""The ``tinytrain`` command: ``summary``, ``memory``, ``compile``, ``search``, ``verify``, ``demo``; the
device verbs ``micro create-project / list-templates / build / flash / reset-params``, ``run`` and ``export``.

Every user error prints one line, ``tinytrain: error: ...``, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .errors import InputError, TinyTrainError
from .search import command as search_command

EPILOG = """examples:
  tinytrain demo                         pretrain on digits 0-4, fine-tune on 5-9
  tinytrain summary model.tflite         the layers the sparse-update scheme numbers
  tinytrain summary model.onnx --json    the same, for scripts
  tinytrain memory model.tflite --scheme last-k:4 --plot mem.png
  tinytrain compile model.onnx --scheme last-k:4 --budget 256KB -o model.tar
  tinytrain search model.tflite --data train.npz --budget 100KB -o scheme.json --jobs 2
  tinytrain compile model.tflite --scheme scheme.json --budget 256KB -o model.tar
  tinytrain micro create-project proj model.tar qemu_cortex_m7
  tinytrain micro build proj && tinytrain micro flash proj
  tinytrain run proj --data train.npz --eval test.npz --epochs 3
  tinytrain export proj -o tuned.tflite
"""


def _step_options(parser, scheme: bool = True) -> None:
    """The options of every command that builds a training step."""
    parser.add_argument("model", help="path to a .tflite or .onnx file")
    if scheme:
        parser.add_argument("--scheme", default="full",
                            help="full, last-layer, bias-only, last-k:N, a .json scheme (default full), or "
                                 "auto: search one on --data under --budget first (tinytrain search, cached)")
    parser.add_argument("--no-qas", action="store_true",
                        help="int8 models: train without Quantization-Aware Scaling (to compare)")
    parser.add_argument("--int8-classifier", action="store_true",
                        help="int8 models: keep the last layer int8 (default: float32, as the paper)")
    parser.add_argument("--dequantize", action="store_true",
                        help="int8 TFLite models: train the file's float twin instead (its weights "
                        "dequantized, float arithmetic, float input): the reference int8 training "
                        "approximates")
    parser.add_argument("--headroom", type=_headroom, default={}, metavar="LAYER:BITS[,LAYER:BITS]",
                        help="int8 models: re-quantize these layers (numbered as `summary` numbers "
                        "them) with 0-6 bits of room to grow: weights divided by 2^BITS, scales "
                        "multiplied, so training can take a weight past the file's int8 range "
                        "(e.g. 8:1 for a layer trained whole)")


def _headroom(text: str) -> dict[int, int]:
    """``"8:1,7:2"`` → ``{8: 1, 7: 2}``, for ``--headroom``."""
    from .frontend import MAX_HEADROOM_BITS

    headroom = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        layer, _, bits = item.partition(":")
        if not (layer.isdigit() and bits.isdigit() and int(bits) <= MAX_HEADROOM_BITS):
            raise argparse.ArgumentTypeError(f"{item!r} must read LAYER:BITS with a layer index and "
                                             f"0-{MAX_HEADROOM_BITS} bits (for example 8:1)")
        headroom[int(layer)] = int(bits)
    return headroom


def _load(args):
    """The model of ``args`` and its parameters, as the step options ask."""
    from .frontend import load_model

    return load_model(args.model, float_classifier=not args.int8_classifier, dequantize=args.dequantize,
                      weight_headroom=args.headroom)


def _cmd_summary(args) -> int:
    from .frontend import load_model
    from .layers import format_table, layer_table

    mod, params = load_model(args.model)
    layers = layer_table(mod)
    if args.json:
        x = mod["main"].params[0]
        print(json.dumps({
            "input": {"name": x.name, "shape": [int(d) for d in x.ty.shape],
                      "dtype": str(x.ty.dtype)},
            "layers": [{"index": layer.index, "kind": layer.kind, "weight": layer.weight,
                        "bias": layer.bias, "weight_shape": list(layer.weight_shape),
                        "output_shape": list(layer.output_shape), "macs": layer.macs,
                        "source": layer.source} for layer in layers],
            "parameters": int(sum(v.size for v in params.values())),
        }, indent=2))
        return 0
    x = mod["main"].params[0]
    print(f"{args.model}: input {x.name} {tuple(int(d) for d in x.ty.shape)} {x.ty.dtype}")
    print(format_table(layers, params))
    return 0


def _cmd_memory(args) -> int:
    from .files import check_file
    from .memory_report import memory_report
    from .relay.transform import TinyTrain
    from .search.command import resolve_auto

    if args.plot is not None:
        check_file(args.plot)  # before the minutes the plan may take
    resolve_auto(args, log=lambda line: print(line, file=sys.stderr))
    mod, _ = _load(args)
    train_mod = TinyTrain(scheme=args.scheme, reorder=not args.no_reorder, qas=not args.no_qas,
                          optimizer=_optimizer(args))(mod)
    report = memory_report(train_mod, compare_tvm=not args.no_tvm)
    if args.plot is not None:
        report.plan.plot_png(args.plot, f"{args.model} — scheme {args.scheme}")
    print(report.to_json() if args.json else report.format())
    return 0


def _rate_problem(lr: float, momentum: float = 0.0) -> str | None:
    """Why ``--lr`` / ``--momentum`` cannot train, or None."""
    if not (math.isfinite(lr) and lr > 0):
        return f"--lr must be a finite number > 0, not {lr}"
    if not 0 <= momentum < 1:
        return f"--momentum must be in [0, 1), not {momentum}"
    return None


def _learning_rate(text: str) -> float:
    """``demo --lr``'s type: a finite number > 0."""
    value = float(text)
    problem = _rate_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _optimizer(args):
    """The SGD of ``compile``, or a one-line InputError for a rate that cannot train."""
    from relay_passes import SGD

    problem = _rate_problem(args.lr, args.momentum)
    if problem:
        raise InputError(problem)
    return SGD(lr=args.lr, momentum=args.momentum)


def _cmd_compile(args) -> int:
    from .codegen.artifact import check_export_path
    from .relay.transform import TinyTrain
    from .search.command import resolve_auto
    from .trainer import build

    check_export_path(args.output)  # before the build, which can take minutes
    resolve_auto(args)
    mod, params = _load(args)
    train_mod = TinyTrain(scheme=args.scheme, loss=args.loss, optimizer=_optimizer(args),
                          qas=not args.no_qas)(mod)
    artifact = build(train_mod, params, target="c", budget=args.budget, model=args.model)
    path = artifact.export(args.output)
    mem = artifact.metadata["memory"]
    print(f"{path}: arena {mem['arena_bytes']:,} B + trainable {mem['trainable_bytes']:,} B + optimizer "
          f"state {mem['optimizer_state_bytes']:,} B = {mem['planned_sram_bytes']:,} B SRAM planned; "
          f"flash {mem['flash_bytes']:,} B")
    return 0


def _options(items: list[str] | None) -> dict[str, str]:
    """``["ram_kb=512", "opt=-O3"]`` → ``{"ram_kb": "512", "opt": "-O3"}``, for ``--option``."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not (key and sep):
            raise InputError(f"--option {item!r} must read KEY=VALUE (for example ram_kb=512)")
        options[key] = value
    return options


def _cmd_create_project(args) -> int:
    from . import micro

    project = micro.create_project(args.artifact, args.template, args.project_dir, _options(args.option),
                                   board=args.board, force=args.force)
    board = f", board {project.board}" if project.board else ""
    print(f"{project.path}: project from template {project.template_name}{board}; "
          f"next: tinytrain micro build {project.path}")
    return 0


def _cmd_list_templates(args) -> int:
    from . import micro

    templates = micro.list_templates()
    if args.json:
        print(json.dumps([{"name": t.name, "description": t.description, "boards": list(t.boards),
                           "options": {o.name: {"default": o.default, "help": o.help,
                                                "choices": list(o.choices)} for o in t.options.values()}}
                          for t in templates], indent=2))
        return 0
    for t in templates:
        print(f"{t.name}: {t.description}")
        if t.boards:
            print(f"  boards (--board): {t.boards[0]} (default), {', '.join(t.boards[1:])}".rstrip(", "))
        for o in t.options.values():
            default = "" if o.default is None else f" (default {o.default})"
            choices = f" [{'|'.join(o.choices)}]" if o.choices else ""
            print(f"  --option {o.name}=VALUE{choices}: {o.help}{default}")
        if not t.options:
            print("  no options")
    return 0


def _cmd_build(args) -> int:
    from . import micro

    project = micro.open_project(args.project_dir)
    print(f"built {project.build()}")
    return 0


def _cmd_flash(args) -> int:
    from . import micro

    project = micro.open_project(args.project_dir)
    project.flash(serial_port=args.serial_port)
    if "flash" in project.template:
        print(f"flashed {project.binary} to {project.board or 'the board'}")
    elif "run" in project.template:
        print(f"{project.binary} is built and its runner installed; nothing to flash for template "
              f"{project.template_name} (the program starts with each session)")
    else:
        print(f"{project.binary} is built; template {project.template_name} has no flash command: put it "
              f"on the board with your own tools")
    return 0


def _cmd_reset_params(args) -> int:
    from . import micro

    project = micro.open_project(args.project_dir)
    with project.session(serial_port=args.serial_port, timeout=args.timeout) as dev:
        dev.reset()
        dev.erase_saved()
    print(f"{project.path}: parameters and optimizer state back to the compiled-in weights; saves erased")
    return 0


def _cmd_run(args) -> int:
    from .run import run

    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = run(args.project_dir, args.data, args.eval, epochs=args.epochs, lr=args.lr,
                 lr_schedule=args.lr_schedule, save_every=args.save_every, serial_port=args.serial_port,
                 timeout=args.timeout, seed=args.seed, progress=sys.stderr.isatty(), log=log)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        if result.cost_per_step is not None:
            print(f"cost per step: {result.cost_per_step:,.0f} {result.cost_unit} (median of {result.steps} "
                  f"steps)")
        if result.saves:
            print(f"saved {result.saves} time(s), newest: save #{result.last_save}")
    return 130 if result.interrupted else 0


def _cmd_export(args) -> int:
    from .export_tuned import export_project

    samples = None
    if args.samples is not None:
        from . import micro
        from .data import load_data

        samples = load_data(args.samples, micro.open_project(args.project_dir).metadata).x
    report = export_project(args.project_dir, args.output, serial_port=args.serial_port, timeout=args.timeout,
                            samples=samples)
    print(report.summary())
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    result = run_demo(pretrain_epochs=args.pretrain_epochs, finetune_epochs=args.epochs, lr=args.lr,
                      seed=args.seed, show_progress=not args.quiet, log=log, output=args.output,
                      target=args.target)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.format())
    return 0


def _cmd_verify(args) -> int:
    from .verify import verify

    report = verify(args.model, samples=args.samples, seed=args.seed,
                    progress=not args.json and sys.stderr.isatty())
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return 0 if report.passed else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinytrain",
        description="On-device training for microcontrollers, as a compiler plugin for "
                    "Apache TVM: import a model, build its training step at compile time, "
                    "train it on the host, or emit it as standalone C for a Cortex-M board.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("summary", help="list a model's conv and linear layers, numbered",
                       description="Import a float .tflite or .onnx model and list its conv "
                                   "and linear layers, numbered from the input as the "
                                   "sparse-update scheme numbers them.")
    s.add_argument("model", help="path to a .tflite or .onnx file")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(run=_cmd_summary)
    m = sub.add_parser("memory", help="plan the memory of one training step and report it",
                       description="Build the training step of MODEL under a sparse-update scheme, "
                                   "lower it to kernels, plan every tensor into one arena and "
                                   "report SRAM (arena + trainable parameters) and flash, with "
                                   "TVM's own StaticPlanBlockMemory figure for comparison.")
    _step_options(m)
    m.add_argument("--no-reorder", action="store_true", help="keep all updates at the end")
    m.add_argument("--no-tvm", action="store_true", help="skip TVM's own planner figure")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.add_argument("--plot", metavar="FILE", help="write a PNG of live bytes per kernel")
    search_command.optimizer_options(m)
    _auto_options(m, budget=True)
    m.set_defaults(run=_cmd_memory)
    c = sub.add_parser("compile", help="emit the training step as standalone C (an artifact)",
                       description="Build the training step of MODEL under a scheme and emit it as C: "
                                   "one static arena of the planned size, TVM's kernels as plain C, "
                                   "frozen parameters in flash. Fails before writing anything when the "
                                   "planned SRAM exceeds --budget.")
    _step_options(c)
    c.add_argument("-o", "--output", required=True,
                   help="artifact folder, or a file ending in .tar (written whole or not at all; an existing "
                        "folder must be empty or an artifact)")
    c.add_argument("--budget", help="SRAM budget, like 256KB; the build fails when the plan needs more")
    c.add_argument("--loss", default="cross_entropy", choices=["cross_entropy", "mse"])
    search_command.optimizer_options(c)
    _auto_options(c, budget=False)
    c.set_defaults(run=_cmd_compile)
    d = sub.add_parser("demo", help="pretrain on digits 0-4, fine-tune on 5-9, report accuracy",
                       description="Transfer learning on scikit-learn's handwritten digits: "
                                   "a small CNN pretrained on 0-4 is fine-tuned on 5-9 with "
                                   "the compile-time training step; prints held-out accuracy "
                                   "before and after, and the time per step.")
    d.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs on the device (default 3)")
    d.add_argument("-o", "--output", default="tinytrain-demo",
                   help="the demo's folder: the int8 model, the project, the data and the exported model "
                        "(default ./tinytrain-demo; replaced only when a demo made it)")
    d.add_argument("--target", default="host", choices=["host", "qemu_cortex_m7"],
                   help="the device: the host program (default) or the emulated Cortex-M7 (needs QEMU)")
    d.add_argument("--pretrain-epochs", type=int, default=5, help="pretraining epochs (default 5)")
    d.add_argument("--lr", type=_learning_rate, default=0.005,
                   help="pretraining SGD (momentum 0.9) learning rate (default 0.005)")
    d.add_argument("--seed", type=int, default=0, help="data split and weight seed (default 0)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    d.set_defaults(run=_cmd_demo)
    v = sub.add_parser("verify", help="compare the imported forward with the format's reference interpreter",
                       description="Run N seeded random inputs through the imported model (an int8 file as "
                                   "its own integer graph, compiled for the host) and through the reference "
                                   "interpreter of its format: LiteRT's reference kernels for .tflite, "
                                   "onnxruntime without graph optimizations for .onnx. Prints the verdict "
                                   "first, then the errors (float: relative to the output range; int8: in "
                                   "output steps) and top-1 agreement. Exit 0 when they agree, 1 when not. "
                                   'Needs pip install "tvm-tinytrain[verify]".')
    v.add_argument("model", help="path to a .tflite or .onnx file")
    v.add_argument("--samples", type=int, default=100, help="random inputs to compare on (default 100)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.set_defaults(run=_cmd_verify)
    search_command.add_parser(sub, _step_options)
    _micro_parsers(sub)
    _run_parser(sub)
    e = sub.add_parser("export", help="write the device's learned parameters into the model file",
                       description="Read the trainable parameters from PROJECT_DIR's device and write the "
                                   "original model file with them: .tflite (int8 weights as the device "
                                   "holds them) or .onnx.")
    e.add_argument("project_dir", metavar="PROJECT_DIR", help="a project folder micro create-project made")
    e.add_argument("-o", "--output", required=True, help="the tuned model file, .tflite or .onnx")
    e.add_argument("--samples", metavar="DATA.npz",
                   help="inputs (x of an .npz, as for run) that set a requantized int8 classifier's output "
                        "range from its learned logits; without them a bound that never clips, coarser")
    _device_options(e)
    e.set_defaults(run=_cmd_export)
    return p


def _auto_options(parser, budget: bool) -> None:
    """The options of ``--scheme auto`` (the search's), in their own group of the help."""
    group = parser.add_argument_group("--scheme auto (a search first; see tinytrain search --help)")
    search_command.data_option(group, required=False)
    if budget:
        group.add_argument("--budget", help="the SRAM budget the searched scheme must fit, like 100KB")
    search_command.search_options(group)


def _device_options(parser) -> None:
    """How to reach the device of a project: its serial port and how long to wait for it."""
    parser.add_argument("--serial-port", metavar="PORT",
                        help="the board's serial port (e.g. /dev/ttyACM0); host and QEMU projects need none")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds to wait for each answer of the device (default 30)")


def _micro_parsers(sub) -> None:
    micro = sub.add_parser("micro", help="make, build and flash a device project (tvmc's micro verbs)",
                           description="Device projects: a template of microtvm_projects with an artifact "
                                       "from `tinytrain compile`, built by its own toolchain.")
    verbs = micro.add_subparsers(dest="verb", required=True, metavar="VERB")
    project_dir = {"metavar": "PROJECT_DIR", "help": "a project folder micro create-project made"}
    cp = verbs.add_parser("create-project", help="make a project folder from an artifact and a template",
                          description="Copy TEMPLATE, the shared device code and ARTIFACT into PROJECT_DIR, "
                                      "which then builds by itself. The folder remembers its template, "
                                      "board and options: build, flash and run take only PROJECT_DIR. "
                                      "(Replaces the old `tinytrain create-project ARTIFACT --template T -o "
                                      "DIR`.)")
    cp.add_argument("project_dir", metavar="PROJECT_DIR",
                    help="the new project folder; an existing one is refused unless --force")
    cp.add_argument("artifact", metavar="ARTIFACT",
                    help="an artifact folder or .tar from `tinytrain compile`")
    cp.add_argument("template", metavar="TEMPLATE",
                    help="host, qemu_cortex_m7, ... (see micro list-templates), or a folder with a "
                         "template.json")
    cp.add_argument("--board", help="the board, for a template with boards (see micro list-templates)")
    cp.add_argument("--option", action="extend", nargs="+", metavar="KEY=VALUE",
                    help="template options, e.g. ram_kb=512 (see micro list-templates)")
    cp.add_argument("--force", action="store_true",
                    help="replace an existing PROJECT_DIR, once the new project is complete; only an empty "
                         "folder or a project create-project made is ever replaced")
    cp.set_defaults(run=_cmd_create_project)
    lt = verbs.add_parser("list-templates", help="the templates, their options and boards",
                          description="Each template of microtvm_projects: what it is, its options "
                                      "(--option KEY=VALUE, with defaults) and its boards (--board).")
    lt.add_argument("--json", action="store_true", help="print JSON")
    lt.set_defaults(run=_cmd_list_templates)
    b = verbs.add_parser("build", help="build a project with its template's toolchain",
                         description="Run the template's build (make; west build -b BOARD for zephyr) with "
                                     "the project's options, in PROJECT_DIR.")
    b.add_argument("project_dir", **project_dir)
    b.set_defaults(run=_cmd_build)
    f = verbs.add_parser("flash", help="put the built program on the device",
                         description="Board templates: run the template's flash command (west flash). Host "
                                     "and QEMU: check the program is built and its runner installed.")
    f.add_argument("project_dir", **project_dir)
    f.add_argument("--serial-port", metavar="PORT", help="the board's serial port (e.g. /dev/ttyACM0)")
    f.set_defaults(run=_cmd_flash)
    r = verbs.add_parser("reset-params", help="go back to the compiled-in weights, erasing the saves",
                         description="Open a session with the device, reset its parameters and optimizer "
                                     "state to the compiled-in ones and erase its saved parameters, so the "
                                     "next run starts from the artifact's weights.")
    r.add_argument("project_dir", **project_dir)
    _device_options(r)
    r.set_defaults(run=_cmd_reset_params)


def _run_parser(sub) -> None:
    r = sub.add_parser("run", help="train a project's device on an .npz or a folder of images",
                       description="Stream the samples of --data to PROJECT_DIR's device (host program, "
                                   "QEMU, or a board on --serial-port) for --epochs epochs, saving its "
                                   "parameters as it goes; print the eval accuracy (or MSE) before and "
                                   "after, the mean loss per epoch and the device's cost per step. The "
                                   "device boots from its last save: a second run continues the first. "
                                   "Ctrl-C stops after the current step, saves and exits 130.")
    r.add_argument("project_dir", metavar="PROJECT_DIR", help="a project folder micro create-project made")
    r.add_argument("--data", required=True, metavar="TRAIN",
                   help="training data: an .npz with x (samples in the model file's own layout, stacked) "
                        "and y (one integer class each; omitted for an autoencoder), or a folder with one "
                        "sub-folder of images per class; float data for an int8 model is quantized with "
                        "its input scale")
    r.add_argument("--eval", metavar="TEST", help="evaluation data, the same formats; measured before "
                                                  "and after training")
    r.add_argument("--epochs", type=int, default=1, help="passes over --data (default 1); 0 only evaluates "
                                                          "(--eval, else --data)")
    r.add_argument("--lr", type=float, help="set the device's learning rate (kept in its saves); default: "
                                            "the device's current rate")
    r.add_argument("--lr-schedule", choices=["cosine"],
                   help="cosine: decay the rate per step from --lr (or the device's) to 0 over the run")
    r.add_argument("--save-every", type=int, metavar="K",
                   help="save the parameters after every K steps (default: at the end of each epoch)")
    r.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    r.add_argument("--json", action="store_true", help="print the result as one JSON object (messages on "
                                                        "stderr)")
    _device_options(r)
    r.set_defaults(run=_cmd_run)


def main(argv: list[str] | None = None) -> int:
    command = parser()
    args = command.parse_args(argv)
    if getattr(args, "dequantize", False) and (args.no_qas or args.int8_classifier or args.headroom):
        command.error("--dequantize builds a float model: --no-qas, --int8-classifier and --headroom "
                      "are for int8 training; drop one side")
    try:
        return args.run(args)
    except TinyTrainError as err:
        print(f"tinytrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``tinytrain search``, and ``--scheme auto`` of ``compile`` and ``memory``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

DESCRIPTION = """\
Find the sparse-update scheme for MODEL on your data under --budget, as the paper does: a short
fine-tuning run per candidate on the host (the classifier alone, the biases of the last K layers, and
bias-only plus each layer's weights at 1/8, 1/4, 1/2 or all of its output channels), scored on a held-out
--val-split of each class; then an evolutionary search maximises the summed accuracy gains under the budget,
by a memory model calibrated on the planner, and the winner is re-checked by the planner itself.
All runs share one compiled training step (masks pick the scheme). Plans, runs and that step are cached
on disk: an interrupted search resumes, a repeated one fine-tunes nothing. The output file holds the scheme
(any command's --scheme takes it), its planned SRAM and the measured gains."""

EXAMPLES = """examples:
  tinytrain search model.tflite --data train.npz --budget 100KB -o scheme.json --jobs 2
  tinytrain search model.tflite --data images/ --budget 100KB -o scheme.json --plot gains.png
  tinytrain search model.tflite --data train.npz --budget 100KB -o scheme.json --ray HEAD:6379
  tinytrain compile model.tflite --scheme auto --data train.npz --budget 100KB -o model.tar
"""


def data_option(parser, required: bool = True) -> None:
    parser.add_argument("--data", required=required, metavar="TRAIN",
                        help="training data: an .npz with x (samples in the model file's layout) and y "
                             "(one integer class each), or a folder with one sub-folder of images per class; "
                             "float data for an int8 model is quantized with its input scale")


def optimizer_options(parser) -> None:
    """The SGD of the training step: what the runs fine-tune with, and what the plans count (momentum
    keeps one float32 per trained value in SRAM)."""
    parser.add_argument("--lr", type=float, default=0.01,
                        help="SGD learning rate (default 0.01): the device starts with it (a schedule "
                             "changes it between steps with tinytrain_set_learning_rate()); the search's "
                             "runs decay it by a cosine")
    parser.add_argument("--momentum", type=float, default=0.0,
                        help="SGD momentum in [0, 1) (default 0); > 0 keeps a float32 per trained value in "
                             "SRAM, which the plans count")


def search_options(parser) -> None:
    """The options that change what the search measures or how it runs (``search``, ``--scheme auto``)."""
    parser.add_argument("--val-split", type=float, default=0.2, metavar="F",
                        help="fraction of each class held out to score the runs (default 0.2)")
    parser.add_argument("--steps", type=int, default=200, metavar="S",
                        help="training samples per fine-tuning run (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="validation split and sample order (default 0)")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="plan and fine-tune in N local processes (default 1: this one); with --ray, N "
                             "Ray workers (default: one per CPU of the cluster)")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="run the jobs on a Ray cluster: HOST:PORT, ray://HOST:PORT, or local (a Ray "
                             'runtime on this machine); needs pip install "tvm-tinytrain[cluster]"')
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="where plans, runs and the compiled step are cached (default "
                             "$TINYTRAIN_CACHE or ~/.cache/tvm-tinytrain)")
    parser.add_argument("--no-cache", action="store_true", help="measure everything again, cache nothing")


def add_parser(sub, step_options) -> None:
    import argparse

    s = sub.add_parser("search", help="find the sparse-update scheme for your data under a memory budget",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    step_options(s, scheme=False)
    optimizer_options(s)
    data_option(s)
    s.add_argument("--budget", required=True, help="total SRAM of the training step, like 100KB")
    s.add_argument("-o", "--output", required=True, type=Path, metavar="SCHEME.json",
                   help="the scheme file to write (written whole or not at all)")
    search_options(s)
    s.add_argument("--plot", type=Path, metavar="FILE.png", help="plot the measured gains")
    s.add_argument("--json", action="store_true", help="print the result as JSON (progress on stderr)")
    s.set_defaults(run=run_search)


def _search(args, log):
    from .scheme_search import search_scheme

    return search_scheme(
        args.model, args.data, args.budget, val_split=args.val_split, steps=args.steps, lr=args.lr,
        momentum=args.momentum, seed=args.seed, qas=not args.no_qas,
        int8_classifier=args.int8_classifier,
        dequantize=args.dequantize, headroom=args.headroom, jobs=args.jobs, ray=args.ray,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=sys.stderr.isatty(), log=log)


def run_search(args) -> int:
    from ..files import check_file, replacing_file

    check_file(args.output)
    if args.plot is not None:
        check_file(args.plot)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = _search(args, log)
    with replacing_file(args.output) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if args.plot is not None:
        from .plot import plot_gains

        plot_gains(result, args.plot)
    if args.json:
        print(json.dumps({"output": str(args.output), **result.to_json()}, indent=2))
        return 0
    print(summary(result, args.output))
    return 0


def summary(result, output) -> str:
    c, s = result.counts, result.seconds
    return "\n".join([
        f"{output}: {json.dumps(result.scheme)}",
        f"  planned SRAM {result.planned_sram_bytes:,} B ({result.planned_sram_bytes / 1024:.1f} KB) of "
        f"{result.budget_bytes / 1024:.1f} KB; summed gain {100 * result.gain:+.1f} points over the "
        f"classifier alone",
        f"  {c['runs']} runs: {c['runs_fine_tuned']} fine-tuned, {c['runs_from_cache']} from the cache; "
        f"{s['total']:.0f} s",
    ])


def resolve_auto(args, log=print) -> None:
    """``--scheme auto``: run the search (cached) and put its scheme in ``args.scheme``."""
    from ..errors import InputError

    if args.scheme != "auto":
        return
    if args.data is None or args.budget is None:
        raise InputError("--scheme auto searches a scheme: give --data TRAIN and --budget (e.g. 100KB)")
    result = _search(args, log)
    log(f"scheme auto: {json.dumps(result.scheme)} ({result.planned_sram_bytes:,} B planned; "
        f"{result.counts['runs_from_cache']} of {result.counts['runs']} runs from the cache)")
    args.scheme = result.scheme

"""The searched sparse-update scheme against bias-only and the best "last-k layers" scheme, per budget.

Task: the digits transfer task of ``benchmarks/accuracy.py`` (its data, split and input scaling):
``vww_96_int8`` on digit >= 5 vs < 5, ``resnet8_cifar10_int8`` on the 10 digits; int8 + QAS, float
classifier, SGD momentum 0.9, cosine decay from ``LR``.

Per model and budget (50, 100, 150 KB of total SRAM, the planner's figure):

- **searched**: ``tinytrain search`` on the training split (its own 20 % validation split inside;
  the test split is never seen), ``--steps`` samples per contribution run;
- **bias-only**: every bias and the classifier (its planned SRAM shown, over the budget or not);
- **last-k**: weights and biases of the last k layers, the largest k that fits the budget.

Each scheme then trains ``--steps-train`` samples with seeds 0..2 and is scored on the test split.
All of them run as masks on one compiled step (the union of the compared schemes), which
``tests/test_search_masks.py`` proves gives the same updates as a build per scheme.

Search wall time: the first search of a model runs cold (a fresh cache, ``--fresh``), the budgets
after it reuse what it measured, and the last line searches the first budget again (all cached).

    python benchmarks/search.py [--models vww,resnet8] [--jobs 2] [--fresh] [--out benchmarks/results]

writes ``search.md``, ``search.json`` and ``search_gains_<model>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tvm_tinytrain.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import MODELS, SHARED_MODELS, load_data, log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KB = 1024
LR, MOMENTUM = 3e-3, 0.9
BUDGETS_KB = (100, 50, 150)  # the first one runs cold


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vww,resnet8")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS_KB)), help="KB, the first one cold")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200, help="samples per contribution run (default 200)")
    p.add_argument("--steps-train", type=int, default=1500, help="samples per evaluation run (default 1500)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="empty the cache first (a cold search)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


@functools.cache
def model(path: Path):
    """``load_model`` of ``path`` (int8 + float classifier, as the search loads it), once per file."""
    import tvm_tinytrain as tt

    return tt.load_model(str(path))


def task_data(key: str):
    """accuracy.py's split, scaled to the range the model was trained on (float; the search and the
    evaluation quantize it with the model's input scale)."""
    from tvm_tinytrain.quantize import input_quantization

    spec = MODELS[key]
    x_tr, y_tr, x_te, y_te = load_data(spec["size"], spec["task"])
    path = SHARED_MODELS / spec["int8"]
    scale, zero = input_quantization(model(path)[0])
    top = np.float32(scale * (127 - zero))
    return path, (x_tr * top, y_tr), (x_te * top, y_te)


def planned(path: Path, scheme) -> int:
    from tvm_tinytrain.search.memory_model import planned_total
    from tvm_tinytrain.search.worker import optimizer_of

    optimizer = optimizer_of({"lr": LR, "momentum": MOMENTUM})
    return planned_total(model(path)[0], scheme, qas=True, optimizer=optimizer)


def best_last_k(path: Path, num_layers: int, budget: int) -> tuple[int, int] | None:
    """The largest k whose last-k:k scheme fits ``budget``, and its planned bytes (None: none fits):
    k grows until a scheme no longer fits (the need grows with k)."""
    best = None
    for k in range(1, num_layers + 1):
        need = planned(path, f"last-k:{k}")
        if need > budget:
            break
        best = (k, need)
    return best


def evaluate(path: Path, schemes: dict[str, dict], train, test, steps: int, seeds: int, jobs: int) -> dict:
    """name → test accuracies over the seeds, every scheme a mask on one union build."""
    from tvm_tinytrain.data import dataset, model_metadata
    from tvm_tinytrain.layers import layer_table
    from tvm_tinytrain.search.jobs import run_jobs
    from tvm_tinytrain.search.masks import union_scheme
    from tvm_tinytrain.search.worker import WorkerSpec, union_module
    from tvm_tinytrain.trainer import HostTrainer

    mod, params = model(path)
    meta = model_metadata(mod)
    tr, te = dataset(*train, meta), dataset(*test, meta)
    step_options = {"qas": True, "lr": LR, "momentum": MOMENTUM}
    shared = union_scheme(list(schemes.values()), layer_table(mod))
    t0 = time.perf_counter()
    trainer = HostTrainer(union_module(mod, shared, step_options), params)
    lib = Path(f"/tmp/search-bench-{path.stem}.so")
    trainer.export_library(lib)
    log(f"{path.stem}: union step built in {time.perf_counter() - t0:.0f} s ({shared})")
    names = list(schemes)
    accuracies = {name: [] for name in names}
    for seed in range(seeds):
        spec = WorkerSpec(path.name, path.read_bytes(), {}, step_options, shared, lib.read_bytes(),
                          (tr.x, tr.y), (te.x, te.y), steps, seed)
        results = run_jobs(spec, [("finetune", schemes[name]) for name in names], n_jobs=jobs)
        for name, res in zip(names, results):
            accuracies[name].append(res["accuracy"])
            log(f"  {name} seed {seed}: {res['accuracy']:.1%}")
    return accuracies


def run_model(key: str, args) -> dict:
    from tvm_tinytrain.layers import layer_table
    from tvm_tinytrain.search.plot import plot_gains
    from tvm_tinytrain.search.scheme_search import search_scheme

    path, train, test = task_data(key)
    n = len(layer_table(model(path)[0]))
    cache = args.out / "search-cache"
    budgets = [int(b) for b in args.budgets.split(",")]
    searches = []
    for budget_kb in budgets + budgets[:1]:
        t0 = time.perf_counter()
        try:
            result = search_scheme(path, train, budget_kb * KB, steps=args.steps, lr=LR, momentum=MOMENTUM,
                                   jobs=args.jobs, cache_dir=cache, progress=False, log=log)
        except InputError as err:  # a budget below the classifier alone
            log(f"{key} {budget_kb} KB: {err}")
            searches.append({"budget_kb": budget_kb, "wall_s": time.perf_counter() - t0, "result": None,
                             "error": str(err)})
            continue
        wall = time.perf_counter() - t0
        log(f"{key} {budget_kb} KB: {result.scheme} {result.planned_sram_bytes:,} B, {wall:.0f} s, "
            f"{result.counts}")
        searches.append({"budget_kb": budget_kb, "wall_s": wall, "result": result})
        if budget_kb == budgets[0] and len(searches) == 1:
            plot_gains(result, args.out / f"search_gains_{key}.png",
                       f"{MODELS[key]['label']}: contribution analysis, {budget_kb} KB")
    rows, schemes = [], {"bias-only": "bias-only"}
    bias_only = planned(path, "bias-only")
    for s in searches[:len(budgets)]:
        budget = s["budget_kb"] * KB
        if s["result"] is None:
            rows.append({"budget_kb": s["budget_kb"], "error": s["error"], "bias_only_bytes": bias_only})
            continue
        schemes[f"searched@{s['budget_kb']}"] = s["result"].scheme
        lk = best_last_k(path, n, budget)
        if lk:
            schemes[f"last-k:{lk[0]}"] = f"last-k:{lk[0]}"
        rows.append({"budget_kb": s["budget_kb"], "searched": s["result"].scheme,
                     "searched_bytes": s["result"].planned_sram_bytes, "last_k": lk,
                     "bias_only_bytes": bias_only, "search_wall_s": s["wall_s"],
                     "counts": s["result"].counts, "seconds": s["result"].seconds})
    accuracy = evaluate(path, schemes, train, test, args.steps_train, args.seeds, args.jobs)
    return {"model": key, "layers": n, "rows": rows, "accuracy": accuracy,
            "cached_wall_s": searches[-1]["wall_s"],
            "cached_counts": searches[-1]["result"].counts if searches[-1]["result"] else {}}


def _acc(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def markdown(results: list[dict], args) -> str:
    lines = [f"Test accuracy (%, mean ± std over {args.seeds} seeds, {args.steps_train} training samples, "
             f"int8 + QAS); planned total SRAM in KB. Search: {args.steps} samples per run, "
             f"jobs {args.jobs}.",
             "", "| model | budget | searched | KB | bias-only | KB | best last-k | KB | search wall |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for res in results:
        acc = res["accuracy"]
        for row in res["rows"]:
            if "error" in row:
                lines.append(f"| {res['model']} | {row['budget_kb']} KB | nothing fits: {row['error']} |"
                             " | | | | | |")
                continue
            lk = row["last_k"]
            last_k = acc["last-k:" + str(lk[0])] if lk else None
            lk_cell = (f"k={lk[0]}: {_acc(last_k)}", f"{lk[1] / KB:.1f}") if lk else ("none fits", "")
            c, searched = row["counts"], acc["searched@" + str(row["budget_kb"])]
            lines.append(
                f"| {res['model']} | {row['budget_kb']} KB | {_acc(searched)} | "
                f"{row['searched_bytes'] / KB:.1f} | {_acc(acc['bias-only'])} | "
                f"{row['bias_only_bytes'] / KB:.1f} | "
                f"{lk_cell[0]} | {lk_cell[1]} | {row['search_wall_s']:.0f} s ({c['runs_fine_tuned']} of "
                f"{c['runs']} runs fine-tuned) |")
        lines.append(f"| {res['model']} | repeated | | | | | | | {res['cached_wall_s']:.0f} s "
                     f"({res['cached_counts']['runs_fine_tuned']} fine-tuned) |")
    lines += ["", "Schemes:"]
    for res in results:
        for row in res["rows"]:
            if "searched" in row:
                lines.append(f"- {res['model']} {row['budget_kb']} KB: `{json.dumps(row['searched'])}`")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        shutil.rmtree(args.out / "search-cache", ignore_errors=True)
    results = [run_model(key, args) for key in args.models.split(",")]
    (args.out / "search.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "search.md").write_text(markdown(results, args))
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``search_scheme``: a model file, the user's data and a budget → the sparse-update scheme to train.

1. **Plan** (the memory planner, ``tinytrain memory``'s figure): the classifier alone (below the budget,
   nothing can train: the error names that need), the biases down to every depth, and each layer's
   weights at 1/8 and whole with the biases down to it — the points :mod:`.memory_model` is
   calibrated on.
2. **Measure** (:mod:`.contribution`): fine-tune the classifier alone, each ``bias:K``, and bias-only
   plus each (layer, ratio) the calibrated model says could fit, on the training split; score each on
   the validation split. All runs share one compiled training step (every parameter trainable, a mask
   picks the scheme: :mod:`.masks`), built once per model and settings.
3. **Search** (:mod:`.evolution`): the K and the per-layer ratios that maximise the summed gains under
   the budget by the calibrated model; the winner is planned by the real planner and, if over, searched
   again under a tighter budget.

Plans, runs and the compiled step are cached on disk (:mod:`.cache`); plans and runs go to local
processes (``jobs``) or a Ray cluster (``ray``) through :func:`.jobs.run_jobs`.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .cache import Cache, digest
from .contribution import RATIOS, bias_depths, bias_runs, gains, weight_runs
from .worker import WorkerSpec

UNION = "full"
CALIBRATED_RATIOS = (0.125, 1.0)  # planned per layer; the ratios between borrow the nearest one's extra


@dataclass
class SearchResult:
    scheme: dict  # the scheme, in the format every command takes
    planned_sram_bytes: int  # the planner's total SRAM of ``scheme``
    estimated_sram_bytes: int  # the calibrated model's figure for it
    budget_bytes: int
    gain: float  # the summed measured gains of ``scheme`` (accuracy points / 100)
    smallest_sram_bytes: int  # the classifier alone
    runs: dict[str, dict]  # run name → its scheme, accuracy, loss
    bias_gain: dict[int, float]
    weight_gain: dict[tuple[int, float], float]
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The scheme file: the scheme's keys, and under ``search`` what was measured."""
        return {**self.scheme, "search": {
            "budget_bytes": self.budget_bytes,
            "planned_sram_bytes": self.planned_sram_bytes,
            "estimated_sram_bytes": self.estimated_sram_bytes,
            "smallest_sram_bytes": self.smallest_sram_bytes,
            "summed_gain": self.gain,
            "bias_gain": {str(k): v for k, v in self.bias_gain.items()},
            "weight_gain": {f"{i}:{r:g}": v for (i, r), v in self.weight_gain.items()},
            "runs": self.runs,
            "counts": self.counts,
            "seconds": self.seconds,
            "settings": self.settings,
        }}


def split_validation(y: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``val_split`` of each class's samples to validation (stratified, seeded)."""
    if not 0 < val_split < 1:
        raise InputError(f"--val-split must be in (0, 1), not {val_split}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(idx) * val_split))
        if n_val == 0 or n_val == len(idx):
            which = "no validation sample" if n_val == 0 else "no training sample"
            raise InputError(f"class {int(c)} has {len(idx)} sample(s): with --val-split {val_split:g} it "
                             f"gets {which}; add samples of that class or change --val-split")
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train)), np.sort(np.array(val))


def _canonical(scheme_resolved: dict) -> list:
    return sorted(scheme_resolved.items())


class _Measure:
    """Cached plans and runs, the rest sent to the workers."""

    def __init__(self, cache: Cache, jobs: int, ray: str | None, progress: bool):
        self.cache, self.jobs, self.ray, self.progress = cache, jobs, ray, progress
        self.fresh = {"plan": 0, "finetune": 0}

    def many(self, kind: str, keyed: list[tuple[str, dict]], spec: Callable, desc: str) -> list:
        """The values of ``(key, scheme)`` items: cached ones read, the others measured by workers made
        by ``spec()`` (called only when something is missing), each cached as it finishes."""
        from tqdm import tqdm

        from .jobs import run_jobs

        values = [self.cache.get(kind, key) for key, _ in keyed]
        missing = [i for i, v in enumerate(values) if v is None]
        if not missing:
            return values
        bar = tqdm(total=len(missing), desc=desc, unit="run" if kind == "finetune" else "plan",
                   disable=not self.progress, dynamic_ncols=True)

        def done(index, job, value):
            i = missing[index]
            values[i] = value
            self.cache.put(kind, keyed[i][0], value)
            self.fresh[kind] += 1
            bar.update(1)

        try:
            run_jobs(spec(), [(kind, keyed[i][1]) for i in missing], n_jobs=self.jobs, ray_address=self.ray,
                     on_result=done)
        finally:
            bar.close()
        return values


def search_scheme(model, data, budget, *, val_split: float = 0.2, steps: int = 200, lr: float = 0.01,
                  momentum: float = 0.0, seed: int = 0, qas: bool = True, int8_classifier: bool = False,
                  dequantize: bool = False, headroom: dict | None = None, jobs: int | None = None,
                  ray: str | None = None, cache_dir=None, use_cache: bool = True, progress: bool = True,
                  log: Callable[[str], None] = lambda line: None) -> SearchResult:
    """Contribution analysis and evolutionary search for ``model`` on ``data`` under ``budget``.

    ``data``: an ``.npz`` (x, y), a folder of one sub-folder of images per class, or an ``(x, y)`` pair;
    ``val_split`` of each class is held out to score the runs. Each run trains ``steps`` samples at
    ``lr`` (SGD, ``momentum``) under cosine decay. ``jobs`` local processes (default 1: this process),
    or ``ray`` (an address, or ``"local"``) for a Ray cluster, with ``jobs`` workers (default: one per
    CPU of the cluster). Worker processes are spawned: a script calling this needs the usual
    ``if __name__ == "__main__":`` guard."""
    from .. import __version__
    from ..codegen.budget import parse_budget
    from ..data import dataset, load_data, model_metadata
    from ..frontend import load_model
    from ..layers import layer_table
    from ..scheme import resolve
    from . import evolution
    from .memory_model import calibration_schemes, fit, key, param_dtypes, planned_total, scheme_of
    from .worker import optimizer_of

    start = time.perf_counter()
    seconds: dict[str, float] = {}
    budget_bytes = parse_budget(budget)
    if budget_bytes is None:
        raise InputError("the scheme search needs a budget (--budget 100KB)")
    if steps < 1:
        raise InputError(f"--steps must be at least 1, not {steps}")
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs must be at least 1, not {jobs}")
    if ray is not None:
        from .jobs import parse_address

        parse_address(ray)  # its form, before any work; whether it answers, when the first job goes
    load_options = {"float_classifier": not int8_classifier, "dequantize": dequantize,
                    "weight_headroom": dict(headroom or {})}
    mod, params = load_model(model, **load_options)
    layers = layer_table(mod)
    n = len(layers)
    metadata = model_metadata(mod)
    ds = load_data(data, metadata) if isinstance(data, (str, Path)) else dataset(*data, metadata)
    train, val = split_validation(ds.y, val_split, seed)
    step_options = {"qas": qas, "lr": lr, "momentum": momentum}
    cache = Cache(cache_dir, use_cache)
    import tvm

    model_bytes = Path(model).read_bytes()
    model_key = digest("model", model_bytes, load_options, qas, momentum > 0, __version__, tvm.__version__)
    run_key = digest("runs", model_key, ds.x[train], ds.y[train], ds.x[val], ds.y[val], steps, seed, lr,
                     momentum)
    settings = {"val_split": val_split, "steps": steps, "lr": lr, "momentum": momentum, "seed": seed,
                "qas": qas, "int8_classifier": int8_classifier, "train_samples": int(len(train)),
                "val_samples": int(len(val))}
    measure = _Measure(cache, jobs, ray, progress)

    def spec(**extra) -> WorkerSpec:
        return WorkerSpec(Path(model).name, model_bytes, load_options, step_options, UNION, **extra)

    def plan_key(scheme: dict) -> str:
        return digest("plan", model_key, _canonical(resolve(scheme, layers)))

    def run_key_of(scheme: dict) -> str:
        return digest("run", run_key, _canonical(resolve(scheme, layers)))

    def plan_here(scheme: dict) -> int:
        key = plan_key(scheme)
        value = cache.get("plan", key)
        if value is None:
            value = planned_total(mod, scheme, qas=qas, optimizer=optimizer_of(step_options))
            cache.put("plan", key, value)
            measure.fresh["plan"] += 1
        return int(value)

    step = _SharedStep(cache, model_key, spec(), log)
    if not all(cache.has("finetune", run_key_of(run.scheme)) for run in bias_runs(n)):
        step.start()  # the runs will need it: build it while the plans run

    # 1. plans
    t = time.perf_counter()
    smallest = plan_here(scheme_of(0))
    if smallest > budget_bytes:
        raise InputError(f"budget {budget_bytes / 1024:,.1f} KB is below the smallest trainable scheme: the "
                         f"classifier alone needs {smallest:,} B ({smallest / 1024:,.1f} KB) planned; raise "
                         "--budget")
    ks = [0, *bias_depths(n)]  # 0: the classifier alone
    # first the biases down to every depth; then the weights only of the layers whose backward (the
    # biases down to them) fits: training a layer's weights needs at least that
    depth_schemes = [scheme_of(k) for k in range(n + 1)]
    planned = measure.many("plan", [(plan_key(s), s) for s in depth_schemes], spec, "planning depths")
    reach = dict(zip(range(n + 1), planned))
    layers_idx = [i for i in range(n - 1) if reach[n - i] <= budget_bytes]
    calibration = calibration_schemes(ks, layers_idx, n, CALIBRATED_RATIOS)
    planned = measure.many("plan", [(plan_key(s), s) for s in calibration], spec, "planning weights")
    plans = {key(s): int(v) for s, v in zip(calibration, planned)}
    memory = fit(plans, ks, layers, RATIOS, optimizer_of(step_options), dtypes=param_dtypes(mod),
                 layers_idx=layers_idx)
    seconds["plan"] = time.perf_counter() - t

    # 2. runs: the classifier, bias:K, and the (layer, ratio) that could fit
    t = time.perf_counter()
    candidates, seen = [], set()
    for i in layers_idx:
        for r in RATIOS:
            resolved = _canonical(resolve({"weights": {str(i): r}}, layers))
            if (i, str(resolved)) in seen or memory.cost(0, {i: r}) > budget_bytes:
                continue
            seen.add((i, str(resolved)))
            candidates.append((i, r))
    runs = bias_runs(n) + weight_runs(n, candidates)
    keyed = [(run_key_of(run.scheme), run.scheme) for run in runs]

    def finetune_spec() -> WorkerSpec:
        return spec(library=step.library(), train=(ds.x[train], ds.y[train]), val=(ds.x[val], ds.y[val]),
                    steps=steps, seed=seed)

    log(f"fine-tuning {len(runs)} runs of {steps} steps ({len(candidates)} (layer, ratio) candidates under "
        f"the budget), {len(train)} training / {len(val)} validation samples")
    results = measure.many("finetune", keyed, finetune_spec, "fine-tuning")
    seconds["finetune"] = time.perf_counter() - t
    accuracy = {run.name: res["accuracy"] for run, res in zip(runs, results)}
    bias_gain, weight_gain = gains(accuracy, n, candidates)

    # 3. search, re-checked by the planner
    t = time.perf_counter()
    best, rechecks = evolution.fit_to_planner(bias_gain, weight_gain, memory.cost, budget_bytes, plan_here,
                                              plans=plans, seed=seed)
    seconds["search"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    counts = {"runs": len(runs), "runs_fine_tuned": measure.fresh["finetune"],
              "runs_from_cache": len(runs) - measure.fresh["finetune"], "plans": measure.fresh["plan"],
              "cache_hits": cache.hits, "cache_misses": cache.misses, "rechecks": rechecks}
    return SearchResult(
        scheme=best.scheme(), planned_sram_bytes=best.cost,
        estimated_sram_bytes=memory.cost(best.k, best.ratios),
        budget_bytes=budget_bytes, gain=best.gain, smallest_sram_bytes=smallest,
        runs={run.name: {"scheme": run.scheme, **res} for run, res in zip(runs, results)},
        bias_gain=bias_gain, weight_gain=weight_gain, counts=counts, seconds=seconds, settings=settings)


class _SharedStep:
    """The compiled training step every run shares (``UNION`` trainable): read from the cache, or built
    once — in a process of its own started early (:meth:`start`), so that the build overlaps the plans
    (Relax's block builder is not thread-safe: a thread could not build while this process plans)."""

    def __init__(self, cache: Cache, model_key: str, spec: WorkerSpec, log):
        self.spec, self.log = spec, log
        self._tmp = None
        if cache.enabled:
            self.path = cache.path("step", digest("step", model_key, UNION, spec.step_options["qas"],
                                                  spec.step_options["momentum"]), ".so")
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="tinytrain-step-")
            self.path = Path(self._tmp.name) / "step.so"
        self._pool = self._future = None
        self._t0 = 0.0

    def start(self) -> None:
        if self._future is None and not self.path.is_file():
            self.log("building the shared training step in the background (once per model and settings; "
                     "cached)")
            self._t0 = time.perf_counter()
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self._future = self._pool.submit(build_shared_step, self.spec, str(self.path))

    def library(self) -> bytes:
        self.start()
        if self._future is not None:
            try:
                self._future.result()
            finally:
                self._pool.shutdown(cancel_futures=True)
                self._future = None
            self.log(f"  the shared training step is built ({time.perf_counter() - self._t0:.0f} s)")
        return self.path.read_bytes()


def build_shared_step(spec: WorkerSpec, path: str) -> None:
    """Compile ``spec``'s shared step and write it to ``path`` (through a temporary name)."""
    from .worker import SearchWorker

    worker = SearchWorker(spec)
    trainer = worker.build_trainer()
    path = Path(path)
    staging = path.with_name(f".build-{os.getpid()}-{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        trainer.export_library(staging)
        staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)

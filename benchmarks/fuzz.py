"""Fuzz the model readers: every mutated file must load as a working model or be refused in one line.

1. Seeds: the shared pre-trained models (``../shared/models/*.tflite``) and a few ONNX files built
   here (``zoo.small_cnn``, its int8 QDQ twin, a small fully connected network).
2. Each file is one seed with one or two mutations: byte flips, a truncation, a zeroed span, a
   random span; for ONNX also protobuf-level edits (strides 0, negative pads, NaN / inf in an
   initializer, changed dims, a renamed node input, a changed op type or group, a dropped node or
   initializer, a wrong data type, a huge input dimension, an attribute of the wrong type).
3. A pool of worker processes (``--jobs``, default 2), each loading many files with
   ``RLIMIT_AS`` set, runs ``tt.load_model``; a small sample of the files that load (small
   seeds only) also builds a ``last-layer`` training step on llvm and runs one step on a
   random input. A watchdog kills a worker past ``--timeout`` (hang) or over ``--memory-mb``
   of resident memory (oom); a worker that dies is a crash (oom when it died of an allocation).
4. Outcomes: ``loaded+stepped``, ``loaded``, ``refused`` (a one-line ``TinyTrainError``, by
   class), ``raw exception`` (anything else, by type, with the first messages and files),
   ``multi-line error``, ``no layers`` (loads, but ``layer_table`` is empty), ``crash``,
   ``hang``, ``oom``. Only the first three are acceptable.

    python benchmarks/fuzz.py [--count 10000] [--seed 0] [--jobs 2] [--steps 20]
                              [--timeout 180] [--memory-mb 3072] [--out DIR] [--json]

Ctrl-C (or SIGTERM) stops it and prints the report of the files done so far.
``--out DIR`` keeps every file that gave a raw exception, a multi-line error, no layers, a
crash, a hang or an oom, named ``<index>_<seed>_<mutation>.<ext>``, for replay with
``tt.load_model``.

Runtime, 2 cores shared with other jobs, TVM_NUM_THREADS=1: 300 files (``--count 300 --steps 3``)
took 351 s, 1,000 files (``--steps 5 --seed 1``) 782 s, so the default 10,000 files take about 2 to
3.5 hours (extrapolated, not run whole: 0.8-1.2 s a file, plus about 30 s per training step built).
The int8 CNN seeds dominate it: importing an int8 conv builds its TE kernel (about 1 s each in
TVM's ``create_prim_func``; VWW-int8 has 27).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"

GOOD = ("loaded+stepped", "loaded", "refused")
OUTCOMES = (*GOOD, "raw exception", "multi-line error", "no layers", "crash", "hang", "oom")
BYTE_MUTATIONS = ("flip", "truncate", "zero", "random")
ONNX_MUTATIONS = ("strides0", "negative_pads", "nan_initializer", "inf_initializer", "dims", "rename_input",
                  "op_type", "group", "drop_node", "drop_initializer", "data_type", "huge_input",
                  "attribute_type", "kernel_shape")
KEEP = ("raw exception", "multi-line error", "no layers", "crash", "hang", "oom")


# ---- seeds -----------------------------------------------------------------------------
@dataclass
class Seed:
    name: str
    fmt: str            # "onnx" or "tflite"
    data: bytes
    small: bool         # cheap enough to build a training step for
    model: object = None  # the onnx.ModelProto, for field edits


def fc_only_onnx(seed: int = 0):
    """A small fully connected network: (1, 16) → Gemm 32 + Relu → Gemm 8 + Relu → Gemm 4."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "input"
    sizes = [16, 32, 8, 4]
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        w = rng.normal(0, (2 / n_in) ** 0.5, (n_out, n_in)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"),
                  numpy_helper.from_array(np.zeros(n_out, np.float32), f"fc{i}.bias")]
        out = "logits" if i == len(sizes) - 2 else f"fc{i}"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [out], transB=1,
                                      name=f"fc{i}"))
        x = out
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    graph = helper.make_graph(nodes, "fc_only",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def built_seeds(qdq: bool = True) -> list[Seed]:
    """The ONNX seeds built here: zoo.small_cnn, its QDQ int8 twin, a fully connected network."""
    import logging

    from tvm_tinytrain import zoo

    cnn = zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=8)
    models = [("small_cnn", cnn), ("fc_only", fc_only_onnx())]
    if qdq:
        logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's pre-processing advice
        models.append(("small_cnn_qdq", zoo.quantize_qdq(cnn)))
    return [Seed(name, "onnx", m.SerializeToString(), True, m) for name, m in models]


def shared_seeds(names: list[str] | None = None, folder: Path = MODELS) -> list[Seed]:
    """The shared models present in ``folder`` (all, or ``names``); the small ones may step."""
    paths = sorted(folder.glob("*.tflite")) if names is None else [folder / n for n in names]
    return [Seed(p.stem, "tflite", p.read_bytes(), p.stem.startswith("toycar") or "float" in p.stem)
            for p in paths if p.is_file()]


# ---- mutations -------------------------------------------------------------------------
def _byte_mutation(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    n = len(buf)
    if n == 0:
        return bytes(buf)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 17))):
            buf[int(rng.integers(n))] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        return bytes(buf[:int(rng.integers(0, n))])
    else:
        length = int(min(n, rng.integers(1, 257)))
        start = int(rng.integers(0, n - length + 1))
        fill = bytes(length) if kind == "zero" else rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        buf[start:start + length] = fill
    return bytes(buf)


def _onnx_mutation(model, kind: str, rng: np.random.Generator):
    """A copy of ``model`` with one field edited; None when the model has no such field."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    pick = lambda seq: seq[int(rng.integers(len(seq)))] if len(seq) else None  # noqa: E731
    convs = [n for n in g.node if n.op_type == "Conv"]
    floats = [t for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT]

    def attr(node, name):
        return next((a for a in node.attribute if a.name == name), None)

    def set_ints(node, name, values):
        a = attr(node, name)
        if a is not None:
            node.attribute.remove(a)
        node.attribute.append(helper.make_attribute(name, values))

    if kind in ("strides0", "negative_pads", "kernel_shape", "group"):
        node = pick(convs)
        if node is None:
            return None
        if kind == "strides0":
            set_ints(node, "strides", [0, int(rng.integers(0, 2))])
        elif kind == "negative_pads":
            set_ints(node, "pads", [int(v) for v in rng.integers(-3, 2, 4)])
        elif kind == "kernel_shape":
            set_ints(node, "kernel_shape", [int(v) for v in rng.integers(0, 6, int(rng.integers(1, 4)))])
        else:
            a = attr(node, "group")
            if a is not None:
                node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("group", int(rng.choice([0, -1, 3, 7, 1 << 20]))))
    elif kind in ("nan_initializer", "inf_initializer"):
        t = pick(floats)
        if t is None:
            return None
        array = numpy_helper.to_array(t).copy()
        if array.size == 0:
            return None
        array.reshape(-1)[int(rng.integers(array.size))] = np.nan if kind == "nan_initializer" else -np.inf
        t.CopyFrom(numpy_helper.from_array(array, t.name))
    elif kind == "dims":
        t = pick(list(g.initializer))
        if t is None or not len(t.dims):
            return None
        i = int(rng.integers(len(t.dims)))
        t.dims[i] = int(rng.choice([0, t.dims[i] + 1, max(t.dims[i] - 1, 0), t.dims[i] * 2]))
    elif kind == "huge_input":
        dims = g.input[0].type.tensor_type.shape.dim
        if not len(dims):
            return None
        dims[int(rng.integers(len(dims)))].dim_value = int(rng.choice([0, 1 << 20, (1 << 31) - 1, 1 << 40]))
    elif kind == "rename_input":
        node = pick([n for n in g.node if len(n.input)])
        node.input[int(rng.integers(len(node.input)))] = str(rng.choice(["", "missing", g.output[0].name]))
    elif kind == "op_type":
        node = pick(list(g.node))
        node.op_type = str(rng.choice(["Add", "Conv", "Gemm", "Relu", "Softmax", "Sigmoid", "NoSuchOp",
                                       "QuantizeLinear", "DequantizeLinear", "Reshape"]))
    elif kind == "drop_node":
        if not len(g.node):
            return None
        del g.node[int(rng.integers(len(g.node)))]
    elif kind == "drop_initializer":
        if not len(g.initializer):
            return None
        del g.initializer[int(rng.integers(len(g.initializer)))]
    elif kind == "data_type":
        t = pick(list(g.initializer))
        if t is None:
            return None
        t.data_type = int(rng.choice([onnx.TensorProto.INT8, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
                                      onnx.TensorProto.FLOAT16, onnx.TensorProto.STRING, 0]))
    elif kind == "attribute_type":
        node = pick([n for n in g.node if len(n.attribute)])
        if node is None:
            return None
        a = node.attribute[int(rng.integers(len(node.attribute)))]
        a.CopyFrom(helper.make_attribute(a.name, float(rng.normal())
                                         if a.type != onnx.AttributeProto.FLOAT else [1, 2]))
    return m


def mutate(seed: Seed, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutated file of ``seed``: (the mutations applied, joined by '+', the bytes)."""
    kinds = BYTE_MUTATIONS + (ONNX_MUTATIONS if seed.model is not None else ())
    applied, data, model = [], seed.data, seed.model
    for _ in range(1 if rng.random() < 0.8 else 2):
        kind = str(rng.choice(kinds))
        if kind in BYTE_MUTATIONS:
            data, model = _byte_mutation(data, kind, rng), None
            kinds = BYTE_MUTATIONS  # the protobuf is no longer the model
        else:
            edited = _onnx_mutation(model, kind, rng)
            if edited is None:
                continue
            model, data = edited, edited.SerializeToString()
        applied.append(kind)
    return "+".join(applied) or "none", data


# ---- the worker: load (and maybe step) many files --------------------------------------
def _one_line(text: str, limit: int = 300) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:limit]


def _try_step(tt, mod, params) -> None:
    """Build a last-layer training step on llvm and run one step on a random input."""
    x_var = mod["main"].params[0]
    shape = tuple(int(d) for d in x_var.ty.shape)
    out = mod["main"].body.body.ty
    out_shape = tuple(int(d) for d in out.shape)
    loss = "mse" if out_shape == shape else "cross_entropy"
    train_mod = tt.relay.transform.TinyTrain(scheme="last-layer", loss=loss, optimizer=tt.SGD(lr=1e-3))(mod)
    trainer = tt.build(train_mod, params, target="llvm")
    rng = np.random.default_rng(0)
    if str(x_var.ty.dtype) == "int8":
        x = rng.integers(-128, 128, shape, dtype=np.int8)
    else:
        x = rng.standard_normal(shape).astype(np.float32)
    trainer.step(x) if loss == "mse" else trainer.step(x, 0)


def classify(path: str, step: bool) -> dict:
    """Load ``path`` (and step it when asked): the outcome as a dict. Runs in the worker."""
    import tvm_tinytrain as tt

    phase = "load"
    try:
        mod, params = tt.load_model(path)
        layers = tt.layer_table(mod)
        if not layers:
            return {"outcome": "no layers", "kind": "empty layer_table", "message": "", "phase": phase}
        if not step:
            return {"outcome": "loaded", "kind": "", "message": "", "phase": phase}
        phase = "step"
        _try_step(tt, mod, params)
        return {"outcome": "loaded+stepped", "kind": "", "message": "", "phase": phase}
    except tt.TinyTrainError as err:
        text = str(err)
        outcome = "multi-line error" if "\n" in text.strip() or not text.strip() else "refused"
        return {"outcome": outcome, "kind": type(err).__name__, "message": text[:2000], "phase": phase}
    except MemoryError as err:
        return {"outcome": "oom", "kind": "MemoryError", "message": _one_line(str(err)), "phase": phase,
                "exit": True}
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
        return {"outcome": "raw exception", "kind": type(err).__name__, "message": _one_line(str(err)),
                "phase": phase, "where": where}


def _worker(conn, memory_mb: int, log_path: str) -> None:
    """A child process: report "ready", then classify every (index, path, step) it is sent."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    import warnings

    warnings.simplefilter("ignore")
    import tvm_tinytrain  # noqa: F401  (the import, before the limit and the first task's clock)

    if memory_mb:
        limit = memory_mb * 2**20 + _address_space()
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn.send("ready")
    while True:
        task = conn.recv()
        if task is None:
            return
        index, path, step = task
        result = classify(path, step)
        conn.send((index, result))
        if result.get("exit"):
            return


def _address_space() -> int:
    """This process's virtual size in bytes (the imports'), which RLIMIT_AS counts too."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ---- the parent: a pool with a watchdog --------------------------------------------------
@dataclass
class Task:
    index: int
    seed: str
    fmt: str
    mutation: str
    path: str
    step: bool


@dataclass
class Record:
    task: Task
    outcome: str
    kind: str = ""
    message: str = ""
    phase: str = ""
    where: str = ""
    seconds: float = 0.0


class _Slot:
    """One worker process and the task it runs."""

    def __init__(self, ctx, memory_mb: int, log_dir: Path, number: int):
        self.log = log_dir / f"worker{number}.log"
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, memory_mb, str(self.log)), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.task: Task | None = None
        self.started = self.deadline = 0.0
        self.log_offset = self.log.stat().st_size if self.log.exists() else 0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def log_tail(self) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_offset)
                return f.read()[-4000:].decode(errors="replace")
        except OSError:
            return ""


@dataclass
class FuzzReport:
    count: int
    seed: int
    seconds: float
    outcomes: dict[str, int]
    refused: dict[str, int]
    raw: dict[str, dict]
    problems: dict[str, list[dict]] = field(default_factory=dict)
    by_seed: dict[str, dict[str, int]] = field(default_factory=dict)
    kept: str | None = None

    @property
    def bad(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k not in GOOD)

    def as_dict(self) -> dict:
        return {"count": self.count, "seed": self.seed, "seconds": round(self.seconds, 1),
                "outcomes": self.outcomes, "refused_by_class": self.refused, "raw_by_type": self.raw,
                "problems": self.problems, "by_seed": self.by_seed, "kept": self.kept}

    def format(self) -> str:
        lines = [f"{self.count} mutated files in {self.seconds:.0f} s: {self.count - self.bad} loaded or "
                 f"refused in one line, {self.bad} not"]
        for outcome in OUTCOMES:
            lines.append(f"  {outcome:<17} {self.outcomes.get(outcome, 0):>6}")
            if outcome == "refused":
                ranked = sorted(self.refused.items(), key=lambda i: -i[1])
                lines += [f"      {k:<28} {n:>6}" for k, n in ranked]
            if outcome == "raw exception":
                for kind, info in sorted(self.raw.items(), key=lambda i: -i[1]["count"]):
                    lines.append(f"      {kind:<28} {info['count']:>6}")
                    lines += [f"        {e['seed']} {e['mutation']} ({e['phase']}, {e['where']}): "
                              f"{e['message'][:160]}  [{e['file']}]" for e in info["examples"]]
            if outcome not in GOOD and outcome != "raw exception":
                lines += [f"        {e['seed']} {e['mutation']}: {e['kind']} {e['message'][:160]}  "
                          f"[{e['file']}]" for e in self.problems.get(outcome, [])[:5]]
        if self.kept:
            lines.append(f"files kept for replay in {self.kept}")
        return "\n".join(lines)


def _tasks(seeds: list[Seed], count: int, seed: int, folder: Path) -> Iterator[tuple[Task, bytes]]:
    rng = np.random.default_rng(seed)
    for index in range(count):
        s = seeds[int(rng.integers(len(seeds)))]
        mutation, data = mutate(s, rng)
        path = folder / f"{index:05d}_{s.name}_{mutation}.{s.fmt}"
        yield Task(index, s.name, s.fmt, mutation, str(path), False), data


def run_fuzz(seeds: list[Seed], count: int, seed: int = 0, jobs: int = 2, steps: int = 20,
             timeout: float = 180.0, step_timeout: float = 900.0, memory_mb: int = 3072,
             out: str | Path | None = None, progress: bool = False, examples: int = 5) -> FuzzReport:
    """Mutate ``count`` files from ``seeds`` and classify each in a pool of ``jobs`` workers."""
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tinytrain-fuzz-"))
    keep = Path(out) if out else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    env_threads = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = "1"  # the children inherit it
    slots = [_Slot(ctx, memory_mb, work, i) for i in range(jobs)]
    tasks = _tasks(seeds, count, seed, work)
    small = {s.name for s in seeds if s.small}
    records: list[Record] = []
    stepped = 0
    startup_failures: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc="fuzz", file=sys.stderr, unit="file")

    def finish(slot: _Slot, outcome: str, **info) -> None:
        nonlocal stepped
        task = slot.task
        records.append(Record(task, outcome, seconds=time.perf_counter() - slot.started, **info))
        stepped += task.step
        if keep and outcome in KEEP:
            shutil.copy(task.path, keep / Path(task.path).name)
        Path(task.path).unlink(missing_ok=True)
        slot.task = None
        if bar:
            bar.update(1)
            bar.set_postfix(bad=sum(r.outcome not in GOOD for r in records), refresh=False)

    def died(slot: _Slot, why: str = "") -> _Slot:
        """Record the dead (or killed: ``why`` "hang" or "rss") worker's task; start another worker."""
        outcome = {"hang": "hang", "rss": "oom"}.get(why)
        code = slot.proc.exitcode
        slot.kill()
        tail = slot.log_tail()
        if slot.task is not None:
            if outcome is None:
                oom = any(s in tail for s in ("bad_alloc", "MemoryError", "Cannot allocate memory",
                                              "out of memory"))
                outcome = "oom" if oom else "crash"
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            kind = {"hang": f"killed after {slot.deadline - slot.started:.0f} s",
                    "rss": f"killed over {memory_mb} MB resident"}.get(why, f"exit code {code}")
            finish(slot, outcome, kind=kind, message=last[:300])
        if slot.task is None and not slot.ready:
            startup_failures.append(tail)
            if len(startup_failures) > 3:
                raise RuntimeError(f"fuzz: workers die before they are ready; the last log:\n{tail}")
        fresh = _Slot(ctx, memory_mb, work, slots.index(slot))
        slots[slots.index(slot)] = fresh
        return fresh

    try:
        pending = True
        while pending or any(s.task for s in slots):
            now = time.perf_counter()
            for slot in slots:
                if slot.ready and slot.task is None and pending:
                    item = next(tasks, None)
                    if item is None:
                        pending = False
                        continue
                    task, data = item
                    Path(task.path).write_bytes(data)
                    done = len(records) + 1
                    task.step = task.seed in small and stepped < math.ceil(steps * done / count)
                    slot.task, slot.started = task, now
                    slot.deadline = now + (step_timeout if task.step else timeout)
                    slot.conn.send((task.index, task.path, task.step))
            busy = [s for s in slots if s.task is not None or not s.ready]
            if not busy:
                continue
            nearest = min((s.deadline for s in busy if s.task), default=now + 1.0)
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy],
                         timeout=max(0.0, min(nearest - now, 0.5)))
            for slot in list(slots):
                if slot.conn in ready:
                    try:
                        message = slot.conn.recv()
                    except (EOFError, OSError):
                        died(slot)
                        continue
                    if message == "ready":
                        slot.ready = True
                        continue
                    _, result = message
                    finish(slot, result["outcome"], kind=result["kind"], message=result["message"],
                           phase=result["phase"], where=result.get("where", ""))
                    if result.get("exit"):
                        died(slot)
                elif slot.proc.sentinel in ready and not slot.proc.is_alive():
                    died(slot)
            now = time.perf_counter()
            for slot in list(slots):
                if slot.task is None:
                    continue
                if now > slot.deadline:
                    died(slot, "hang")
                elif memory_mb and _rss_mb(slot.proc.pid) > memory_mb:
                    died(slot, "rss")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report the files done so far
        print(f"fuzz: interrupted after {len(records)} of {count} files; the report covers those",
              file=sys.stderr)
    finally:
        for slot in slots:
            try:
                slot.conn.send(None)
            except OSError:
                pass
            slot.proc.join(5)
            slot.kill()
        if bar:
            bar.close()
        if env_threads is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = env_threads
        shutil.rmtree(work, ignore_errors=True)
    return _report(records, count, seed, time.perf_counter() - start, keep, examples)


def _report(records: list[Record], count: int, seed: int, seconds: float, keep: Path | None,
            examples: int) -> FuzzReport:
    outcomes = Counter(r.outcome for r in records)
    refused = Counter(r.kind + (" (at step)" if r.phase == "step" else "") for r in records
                      if r.outcome == "refused")
    raw: dict[str, dict] = {}
    problems: dict[str, list[dict]] = defaultdict(list)
    by_seed: dict[str, Counter] = defaultdict(Counter)
    for r in sorted(records, key=lambda r: r.task.index):
        by_seed[r.task.seed][r.outcome] += 1
        entry = {"file": Path(r.task.path).name, "seed": r.task.seed, "format": r.task.fmt,
                 "mutation": r.task.mutation, "kind": r.kind, "message": r.message, "phase": r.phase,
                 "where": r.where, "seconds": round(r.seconds, 2)}
        if r.outcome == "raw exception":
            info = raw.setdefault(r.kind, {"count": 0, "examples": []})
            info["count"] += 1
            if len(info["examples"]) < examples:
                info["examples"].append(entry)
        elif r.outcome not in GOOD:
            problems[r.outcome].append(entry)
    return FuzzReport(count=len(records), seed=seed, seconds=seconds,
                      outcomes={k: outcomes.get(k, 0) for k in OUTCOMES}, refused=dict(refused), raw=raw,
                      problems=dict(problems), by_seed={k: dict(v) for k, v in by_seed.items()},
                      kept=str(keep) if keep else None)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=10_000, help="mutated files (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--steps", type=int, default=20,
                   help="at most this many loaded files (small seeds) also build and run a training step")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds a load may take (default 180)")
    p.add_argument("--memory-mb", type=int, default=3072,
                   help="memory a worker may use beyond its imports (RLIMIT_AS and resident size)")
    p.add_argument("--models", type=Path, default=MODELS, help="folder of the shared .tflite models")
    p.add_argument("--out", help="keep the files that gave a raw exception (or worse) here")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    seeds = shared_seeds(folder=args.models) + built_seeds()
    if not any(s.fmt == "tflite" for s in seeds):
        print(f"fuzz: no shared models in {args.models}; fuzzing the built ONNX seeds only", file=sys.stderr)
    report = run_fuzz(seeds, args.count, seed=args.seed, jobs=args.jobs, steps=args.steps,
                      timeout=args.timeout, memory_mb=args.memory_mb, out=args.out,
                      progress=not args.json and sys.stderr.isatty())
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return 0 if report.bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

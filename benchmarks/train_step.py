"""Time one training step of MobileNetV2: tvm-tinytrain against PyTorch.

Both frameworks train the same ONNX model from ``tvm_tinytrain.zoo`` (random
weights, 10 classes, batch 1, full update, SGD lr 0.01, cross-entropy) on the
same input and label, with the same number of threads, in one process:

- tvm-tinytrain: compile time of ``TinyTrain(...)(mod)`` + ``build(...)``, then
  the median of ``trainer.step(x, y)`` after warm-up steps;
- PyTorch: ``benchmarks/torch_twin.py``'s module of the same ONNX model, the
  median of forward + backward + ``optimizer.step()`` after warm-up.

Both start from the same weights and apply the same SGD updates, so the
first-step loss and the logits after all steps must agree across the two;
the script prints both, which checks the compiled training step too.

No third-party module is imported at module level: ``main`` sets
``TVM_NUM_THREADS`` first, before anything (tvm_tinytrain, or torch through
tvm_ffi) can import tvm.

    python benchmarks/train_step.py --threads 1 --steps 20 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import onnx

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
WARMUP = 3
LR = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Median time of one full-update SGD training step (batch 1, cross-entropy) of "
        "MobileNetV2 from tvm_tinytrain.zoo, with tvm-tinytrain and with PyTorch, same threads.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for both: TVM_NUM_THREADS and torch.set_num_threads (default 1)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help=f"timed steps per framework, after {WARMUP} warm-up steps (default 20)",
    )
    parser.add_argument(
        "--resolution", type=int, default=128, help="input height and width (default 128)"
    )
    parser.add_argument(
        "--width", type=float, default=0.35, help="MobileNetV2 width multiplier (default 0.35)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and the input (default 0)"
    )
    parser.add_argument(
        "--frameworks",
        default="tvm,torch",
        help="comma-separated subset of tvm,torch to run (default both)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout instead of the markdown table",
    )
    args = parser.parse_args(argv)
    unknown = set(args.frameworks.split(",")) - {"tvm", "torch"}
    if unknown:
        parser.error(f"unknown framework(s) {sorted(unknown)}; choose from tvm, torch")
    if args.threads < 1 or args.steps < 1:
        parser.error("--threads and --steps must be at least 1")
    return args


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_ms(step: Callable[[], float], steps: int, warmup: int = WARMUP) -> tuple[float, float]:
    """Median ms of ``step()`` over ``steps`` calls after ``warmup`` calls; the first result."""
    first = step()
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), first


def bench_tvm(onnx_path: Path, x: np.ndarray, y: int, steps: int) -> dict:
    """Compile the full-update training step with tvm-tinytrain and time ``trainer.step``."""
    import tvm_tinytrain

    mod, params = tvm_tinytrain.load_model(str(onnx_path))
    _progress("tvm-tinytrain: compiling the training step ...")
    start = time.perf_counter()
    train_mod = tvm_tinytrain.relay.transform.TinyTrain(
        scheme="full", loss="cross_entropy", optimizer=tvm_tinytrain.SGD(lr=LR)
    )(mod)
    trainer = tvm_tinytrain.build(train_mod, params, target="llvm")
    compile_s = time.perf_counter() - start
    _progress(f"tvm-tinytrain: compiled in {compile_s:.1f} s, timing {steps} steps ...")
    ms, first = median_ms(lambda: float(trainer.step(x, y)), steps)
    return {
        "framework": "tvm-tinytrain",
        "compile_s": compile_s,
        "median_ms": ms,
        "first_loss": first,
        "trained_logits": trainer.predict(x).reshape(-1).tolist(),
    }


def bench_torch(model: onnx.ModelProto, x: np.ndarray, y: int, steps: int, threads: int) -> dict:
    """Time forward + backward + SGD step of the PyTorch twin of ``model``."""
    import torch

    from benchmarks.torch_twin import torch_module_from_onnx

    torch.set_num_threads(threads)
    net = torch_module_from_onnx(model).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    inputs, label = torch.from_numpy(x), torch.tensor([y])

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(inputs), label)
        loss.backward()
        optimizer.step()
        return loss.item()

    _progress(f"pytorch: timing {steps} steps ...")
    ms, first = median_ms(step, steps)
    with torch.no_grad():
        logits = net(inputs).reshape(-1).tolist()
    return {
        "framework": "pytorch",
        "compile_s": None,
        "median_ms": ms,
        "first_loss": first,
        "trained_logits": logits,
    }


def markdown_table(rows: list[dict], threads: int) -> str:
    lines = [
        "| framework | compile s | median ms/step | threads | first-step loss |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        compile_s = "-" if row["compile_s"] is None else f"{row['compile_s']:.2f}"
        cells = [row["framework"], compile_s, f"{row['median_ms']:.2f}", str(threads)]
        lines.append("| " + " | ".join([*cells, f"{row['first_loss']:.6f}"]) + " |")
    return "\n".join(lines)


def logit_difference(rows: list[dict]) -> float | None:
    """Max |difference| of the two frameworks' logits after training, when both ran."""
    if len(rows) < 2:
        return None
    a, b = (row["trained_logits"] for row in rows[:2])
    return max(abs(u - v) for u, v in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before any import of tvm
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    import numpy as np
    import onnx

    from tvm_tinytrain import zoo

    model = zoo.mobilenet_v2(
        width_mult=args.width, resolution=args.resolution, num_classes=NUM_CLASSES, seed=args.seed
    )
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(-1.0, 1.0, (1, 3, args.resolution, args.resolution)).astype(np.float32)
    y = int(rng.integers(NUM_CLASSES))
    frameworks = args.frameworks.split(",")

    rows = []
    if "tvm" in frameworks:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / "mobilenet_v2.onnx"
            onnx.save(model, onnx_path)
            rows.append(bench_tvm(onnx_path, x, y, args.steps))
    if "torch" in frameworks:
        rows.append(bench_torch(model, x, y, args.steps, args.threads))
    diff = logit_difference(rows)

    if args.json:
        report = {
            "model": f"mobilenet_v2-w{args.width}",
            "resolution": args.resolution,
            "num_classes": NUM_CLASSES,
            "macs": zoo.count_macs(model),
            "threads": args.threads,
            "steps": args.steps,
            "warmup": WARMUP,
            "label": y,
            "results": rows,
            "max_abs_logit_difference": diff,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"MobileNetV2-w{args.width} at {args.resolution}x{args.resolution}, "
        f"{NUM_CLASSES} classes, batch 1, full update, SGD lr {LR}\n"
    )
    print(markdown_table(rows, args.threads))
    if diff is not None:
        print(f"\nlogits after {WARMUP + args.steps} steps: max |tvm - torch| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

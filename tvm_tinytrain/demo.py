"""``tinytrain demo``: transfer learning on real handwritten digits, end to end.

A small CNN (built as ONNX, imported like any user model) is pretrained on
the digits 0–4 of scikit-learn's ``load_digits``, then fine-tuned on 5–9 with
the compile-time training graph. Accuracy on the held-out 5–9 digits is
printed before and after, with the time per training step.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from relay_passes import SGD

from . import zoo
from .frontend import load_model
from .relay.transform import TinyTrain
from .trainer import build


@dataclass
class DemoResult:
    pretrain_accuracy: float  # digits 0-4, held out
    before_accuracy: float  # digits 5-9, held out, before fine-tuning
    after_accuracy: float  # digits 5-9, held out, after fine-tuning
    finetune_steps: int
    median_step_ms: float
    compile_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


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


def run_demo(pretrain_epochs: int = 5, finetune_epochs: int = 2, lr: float = 0.005,
             seed: int = 0, show_progress: bool = True, log=print) -> DemoResult:
    (xa_tr, xa_te, ya_tr, ya_te), (xb_tr, xb_te, yb_tr, yb_te) = digit_splits(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits_cnn.onnx"
        onnx.save(zoo.small_cnn(num_classes=10, input_hw=(8, 8), width=16, seed=seed), path)
        mod, params = load_model(path)
    optimizer = SGD(lr=lr, momentum=0.9)
    train_mod = TinyTrain(scheme="full", loss="cross_entropy", optimizer=optimizer)(mod)

    log(f"pretraining a {len(params)}-tensor CNN on digits 0-4 ({len(ya_tr)} samples)")
    trainer = build(train_mod, params)
    with tqdm(total=pretrain_epochs * len(ya_tr), desc="pretrain", disable=not show_progress) as bar:
        def progress(done: int, total: int, loss: float) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        trainer.fit(xa_tr, ya_tr, epochs=pretrain_epochs, seed=seed, progress=progress)
    pretrain_acc = trainer.evaluate(xa_te, ya_te)
    log(f"accuracy on held-out digits 0-4: {pretrain_acc:.1%}")

    t0 = time.perf_counter()
    tuner = build(TinyTrain(scheme="full", optimizer=optimizer)(mod), trainer.params())
    compile_s = time.perf_counter() - t0
    before = tuner.evaluate(xb_te, yb_te)
    log(f"fine-tuning on digits 5-9 ({len(yb_tr)} samples); compiled in {compile_s:.1f} s")
    times: list[float] = []
    rng = np.random.default_rng(seed)
    with tqdm(total=finetune_epochs * len(yb_tr), desc="fine-tune", disable=not show_progress) as bar:
        for _ in range(finetune_epochs):
            for i in rng.permutation(len(yb_tr)):
                t = time.perf_counter()
                loss = tuner.step(xb_tr[i], yb_tr[i])
                times.append(time.perf_counter() - t)
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    after = tuner.evaluate(xb_te, yb_te)
    return DemoResult(pretrain_acc, before, after, len(times),
                      float(np.median(times) * 1e3), compile_s)

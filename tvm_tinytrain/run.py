"""Train a device on a data set: what ``tinytrain run`` does, as a library function.

::

    from tvm_tinytrain.run import run
    result = run("proj", "train.npz", eval_data="test.npz", epochs=3, progress=True, log=print)
    result.accuracy_before, result.accuracy_after, result.cost_per_step, result.cost_unit

One session with the project's device program (host process, QEMU, or a board on a serial
port): evaluate the eval set, stream the training samples epoch by epoch (shuffled, seeded),
save the device's parameters after every ``save_every`` steps (default: at the end of each
epoch), evaluate again. The device boots from its newest save, so a second run continues where
the first stopped. Ctrl-C (SIGINT) during training stops after the current step, saves and
returns what was done (``interrupted``).
"""

from __future__ import annotations

import signal
import statistics
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import Dataset, dataset, load_data
from .errors import InputError
from .trainer import LR_SCHEDULES, checked_learning_rate, cosine_learning_rate


@dataclass
class RunResult:
    """What a run did; ``as_dict()`` is ``tinytrain run --json``'s object."""

    loss: str                               # "cross_entropy" or "mse"
    epochs: int                             # epochs completed
    steps: int                              # training steps the device applied
    mean_loss: list[float]                  # per epoch (the last one partial when interrupted)
    cost_per_step: float | None             # median of the device's step cost
    cost_unit: str                          # "ns" (host), "instructions" (QEMU), "cycles" (board)
    boot: dict = field(default_factory=dict)  # where the parameters came from: source, sequence, message
    saves: int = 0                          # saves done in this run
    last_save: int | None = None            # sequence number of the newest save
    accuracy_before: float | None = None    # cross_entropy: eval top-1
    accuracy_after: float | None = None
    mse_before: float | None = None         # mse: eval mean squared error
    mse_after: float | None = None
    eval_samples: int = 0
    learning_rate: float | None = None      # the rate the run started from
    interrupted: bool = False

    def as_dict(self) -> dict:
        out = asdict(self)
        drop = ("mse_before", "mse_after") if self.loss == "cross_entropy" else ("accuracy_before",
                                                                                  "accuracy_after")
        return {k: v for k, v in out.items() if k not in drop}


def _data(value, metadata: dict, name: str) -> Dataset:
    if isinstance(value, Dataset):
        return value
    if isinstance(value, (str, Path)):
        return load_data(value, metadata, None)
    if isinstance(value, tuple) and len(value) == 2:
        return dataset(value[0], value[1], metadata, name)
    raise InputError(f"{name} must be an .npz or image-folder path, a Dataset or an (x, y) tuple, not "
                     f"{type(value).__name__}")


def _boot(dev) -> dict:
    boot = dev.boot
    return {"source": boot.source, "sequence": boot.sequence, "message": boot.message}


def evaluate(dev, data: Dataset, loss: str, progress: bool = False) -> float:
    """Top-1 accuracy (cross_entropy) or mean squared error (mse) of the device on ``data``."""
    from tqdm import tqdm

    scores = []
    for i in tqdm(range(len(data)), desc="eval", unit="sample", leave=False, disable=not progress):
        if loss == "cross_entropy":
            scores.append(float(np.argmax(dev.predict(data.x[i])) == int(data.y[i])))
        elif data.y is None:
            scores.append(dev.anomaly_score(data.x[i]))
        else:
            scores.append(np.mean((dev.predict(data.x[i]).astype(np.float64) - data.y[i]) ** 2))
    return float(np.mean(scores))


class _StopFlag:
    """Ctrl-C sets it instead of raising; a second Ctrl-C raises as usual."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def run(project, data, eval_data=None, *, epochs: int = 1, lr: float | None = None,
        lr_schedule: str | None = None, save_every: int | None = None, serial_port: str | None = None,
        timeout: float = 30.0, seed: int = 0, progress: bool = False,
        log: Callable[[str], None] | None = None) -> RunResult:
    """Train ``project``'s device on ``data`` for ``epochs`` and evaluate it on ``eval_data``.

    ``project``: a :class:`~tvm_tinytrain.micro.Project` or its folder. ``data`` / ``eval_data``: an
    ``.npz`` path, a :class:`~tvm_tinytrain.data.Dataset` or an ``(x, y)`` tuple (``y`` None for an
    autoencoder); ``eval_data`` None and ``epochs`` 0 evaluates ``data``. ``lr`` sets the device's
    learning rate (it is saved with the parameters); ``lr_schedule="cosine"`` decays it per step
    from ``lr`` (or the device's rate) to 0 over the run, and the saves keep the starting rate.
    ``save_every``: save after every K steps and at the end (default: at the end of each epoch).
    ``progress``: a tqdm bar on stderr. ``log``: called with each line a user reads (the boot
    message, each epoch's loss). Raises :class:`~tvm_tinytrain.errors.InputError` for bad data or
    settings before the device starts, DeviceError when the device stops answering."""
    from .micro import Project, open_project

    if not isinstance(project, Project):
        project = open_project(project)
    epochs, save_every = _checked_counts(epochs, save_every)
    if lr is not None:
        lr = checked_learning_rate(lr)
        if lr == 0:
            raise InputError("--lr must be > 0 (a rate of 0 does not train)")
    if lr_schedule not in (None, *LR_SCHEDULES):
        raise InputError(f"unknown learning-rate schedule {lr_schedule!r}; "
                         f"choose one of {', '.join(LR_SCHEDULES)}")
    metadata = project.metadata
    loss = metadata["loss"]
    train = _data(data, metadata, "data")
    if eval_data is None and epochs == 0:
        evalset = train
    else:
        evalset = None if eval_data is None else _data(eval_data, metadata, "eval data")
    say = log or (lambda _line: None)

    with project.session(serial_port=serial_port, timeout=timeout) as dev:
        boot = _boot(dev)
        say(f"device: {boot['message']}")
        result = RunResult(loss=loss, epochs=0, steps=0, mean_loss=[], cost_per_step=None,
                           cost_unit=dev.cost_unit, boot=boot,
                           eval_samples=0 if evalset is None else len(evalset))
        if lr is not None:
            dev.learning_rate = lr
        base = dev.learning_rate
        result.learning_rate = base
        metric = "accuracy" if loss == "cross_entropy" else "mse"
        if evalset is not None:
            before = evaluate(dev, evalset, loss, progress)
            setattr(result, f"{metric}_before", before)
            say(f"{metric} before: {_fmt(metric, before)} ({len(evalset)} samples of {evalset.name})")
        if epochs:
            _train(dev, train, result, epochs, base, lr_schedule, save_every, seed, progress, say)
        if evalset is not None:
            after = before if epochs == 0 else None
            if after is None and not result.interrupted:
                after = evaluate(dev, evalset, loss, progress)
            setattr(result, f"{metric}_after", after)
            if after is not None and epochs:
                say(f"{metric} after:  {_fmt(metric, after)}")
    return result


def _checked_counts(epochs, save_every) -> tuple[int, int | None]:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise InputError(f"epochs must be an integer >= 0, not {epochs!r}")
    integer = isinstance(save_every, (int, np.integer)) and not isinstance(save_every, bool)
    if save_every is not None and not (integer and save_every >= 1):
        raise InputError(f"save_every must be an integer >= 1 (steps between saves), not {save_every!r}")
    return int(epochs), None if save_every is None else int(save_every)


def _fmt(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric == "accuracy" else f"{value:.6g}"


def _train(dev, train: Dataset, result: RunResult, epochs: int, base: float, schedule: str | None,
           save_every: int | None, seed: int, progress: bool, say) -> None:
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    total = epochs * len(train)
    costs: list[float] = []
    unsaved = 0

    def save():
        nonlocal unsaved
        if schedule == "cosine":
            dev.learning_rate = base  # a save keeps the starting rate, not the decayed one
        result.last_save = dev.save()
        result.saves += 1
        unsaved = 0

    with _StopFlag() as stop, tqdm(total=total, disable=not progress, unit="step", leave=False) as bar:
        for epoch in range(epochs):
            losses = []
            bar.set_description(f"epoch {epoch + 1}/{epochs}")
            for i in rng.permutation(len(train)):
                if schedule == "cosine":
                    dev.learning_rate = cosine_learning_rate(base, result.steps, total)
                loss = dev.train_step(train.x[i], None if train.y is None else train.y[i])
                losses.append(float(loss))
                if dev.last_cost is not None:
                    costs.append(float(dev.last_cost))
                result.steps += 1
                unsaved += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                if save_every is not None and unsaved >= save_every:
                    save()
                if stop.set:
                    break
            result.mean_loss.append(float(np.mean(losses)))
            if stop.set:
                result.interrupted = True
                break
            result.epochs += 1
            if save_every is None:
                save()
            say(f"epoch {epoch + 1}/{epochs}: mean loss {result.mean_loss[-1]:.4f} ({len(losses)} steps)")
        if unsaved:
            save()
    if costs:
        result.cost_per_step = float(statistics.median(costs))
    if result.interrupted:
        say(f"interrupted after {result.steps} steps; the device's parameters are saved")

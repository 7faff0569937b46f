"""A search worker: one process (or Ray actor) that plans and fine-tunes candidate schemes.

It is built from a :class:`WorkerSpec`, which carries everything by value (the model file's bytes,
the compiled training step's bytes, the data), so it runs the same on this machine and on another
machine of a Ray cluster. Set-up (import TVM, read the model, load the library) happens once per
worker; then ``run(job)`` answers jobs:

- ``("plan", scheme)`` → the planner's total SRAM of that scheme, bytes (``tinytrain memory``'s figure);
- ``("finetune", scheme)`` → accuracy and loss on the validation split after a short fine-tuning of
  the one training step every candidate shares, masked to that scheme.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .contribution import evaluate, finetune


@dataclass
class WorkerSpec:
    model_name: str  # the model file's name (its suffix says the format)
    model_bytes: bytes
    load_options: dict  # load_model's float_classifier, dequantize, weight_headroom
    step_options: dict  # qas, lr, momentum
    union: str | dict = "full"  # what the shared training step trains
    library: bytes | None = None  # the compiled shared step (finetune jobs)
    train: tuple[np.ndarray, np.ndarray] | None = None
    val: tuple[np.ndarray, np.ndarray] | None = None
    steps: int = 200
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __call__(self) -> SearchWorker:
        return SearchWorker(self)


def optimizer_of(step_options: dict):
    from relay_passes import SGD

    return SGD(lr=step_options["lr"], momentum=step_options["momentum"])


def union_module(mod, union, step_options: dict):
    """The training step every candidate shares: ``union`` trainable, the search's optimizer."""
    from ..relay.transform import TinyTrain

    return TinyTrain(scheme=union, optimizer=optimizer_of(step_options), qas=step_options["qas"])(mod)


class SearchWorker:
    def __init__(self, spec: WorkerSpec):
        from ..frontend import load_model
        from ..layers import layer_table

        self.spec = spec
        self._dir = tempfile.TemporaryDirectory(prefix="tinytrain-search-")
        path = Path(self._dir.name) / Path(spec.model_name).name
        path.write_bytes(spec.model_bytes)
        self.mod, self.params = load_model(path, **spec.load_options)
        self.layers = layer_table(self.mod)
        self.trainer = None
        if spec.library is not None:
            library = Path(self._dir.name) / "step.so"
            library.write_bytes(spec.library)
            self.trainer = self.build_trainer(library)

    def build_trainer(self, library: Path | None = None):
        """The shared step's HostTrainer: compiled here, or loaded from ``library``."""
        from ..trainer import HostTrainer

        train_mod = union_module(self.mod, self.spec.union, self.spec.step_options)
        return HostTrainer(train_mod, self.params, library=library)

    def run(self, job: tuple[str, dict]):
        kind, scheme = job
        if kind == "plan":
            from .memory_model import planned_total

            return planned_total(self.mod, scheme, qas=self.spec.step_options["qas"],
                                 optimizer=optimizer_of(self.spec.step_options))
        if kind == "finetune":
            return finetune_and_evaluate(self.trainer, self.layers, self.spec, scheme)
        raise ValueError(f"unknown job kind {kind!r}")


def finetune_and_evaluate(trainer, layers, spec: WorkerSpec, scheme: dict) -> dict:
    """Fine-tune ``scheme`` (a mask on the shared step) from the model's weights, then evaluate."""
    from ..scheme import resolve
    from .masks import mask_for

    trainer.reset()
    trainer.mask = mask_for(scheme, layers, resolve(spec.union, layers))
    result = finetune(trainer, *spec.train, steps=spec.steps, seed=spec.seed)
    result.update(evaluate(trainer, *spec.val))
    trainer.mask = None
    return result

"""Contribution analysis: how much each part of a sparse update is worth, measured on held-out data.

The paper's method (Lin et al., NeurIPS 2022, §3.2), on the user's data:

- ``bias:K`` — the biases of the last K layers and the classifier, against the classifier alone
  (``classifier``): ``bias_gain[K] = acc(bias:K) − acc(classifier)``, for a handful of K;
- ``weight:I:R`` — every bias and the classifier (``bias-only`` = ``bias:N``) plus the weights of
  layer I at ratio R of its output channels: ``weight_gain[(I, R)] = acc(weight:I:R) − acc(bias:N)``.

Each run is a short fine-tuning of the same training step (one build; a mask selects the scheme,
:mod:`.masks`) from the model's own weights, with the paper's cosine learning-rate decay and the same
sample order in every run (common random numbers: the gains differ by the scheme, not by the order),
then top-1 accuracy and mean cross-entropy on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NonFiniteError
from .memory_model import scheme_of

RATIOS = (0.125, 0.25, 0.5, 1.0)
CLASSIFIER = "classifier"


@dataclass(frozen=True)
class Run:
    """One fine-tuning run: its name (``classifier``, ``bias:K``, ``weight:I:R``) and its scheme."""

    name: str
    scheme: dict


def bias_depths(num_layers: int) -> list[int]:
    """The K of the ``bias:K`` runs: 1, then about every sixth of the depth, and every layer (bias-only)."""
    ks = {1, num_layers}
    ks.update(max(1, round(num_layers * j / 6)) for j in range(1, 6))
    return sorted(ks)


def bias_runs(num_layers: int) -> list[Run]:
    """The classifier-only run and the ``bias:K`` runs."""
    return [Run(CLASSIFIER, scheme_of(0))] + [Run(f"bias:{k}", scheme_of(k))
                                                for k in bias_depths(num_layers)]


def weight_runs(num_layers: int, candidates: list[tuple[int, float]]) -> list[Run]:
    """The ``weight:I:R`` runs of the (layer, ratio) candidates."""
    return [Run(f"weight:{i}:{r:g}", scheme_of(num_layers, {i: r})) for i, r in candidates]


def finetune(trainer, x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> dict:
    """``steps`` steps from the trainer's current values at its learning rate under cosine decay;
    a step that would make a value inf/NaN ends the run (the step is not applied)."""
    try:
        losses = trainer.fit(x, y, steps=steps, seed=seed, lr_schedule="cosine")
        diverged = None
    except NonFiniteError:
        losses, diverged = [], trainer.steps_done
    return {"train_loss": float(np.mean(losses[-50:])) if losses else None, "diverged_at": diverged}


def evaluate(trainer, x: np.ndarray, y: np.ndarray) -> dict:
    """Top-1 accuracy and mean cross-entropy over ``x``, ``y`` (the validation split)."""
    hits, loss = 0, 0.0
    for xi, yi in zip(x, y):
        logits = trainer.predict(xi).astype(np.float64).reshape(-1)
        shifted = logits - logits.max()
        loss += float(np.log(np.exp(shifted).sum()) - shifted[int(yi)])
        hits += int(np.argmax(logits) == int(yi))
    return {"accuracy": hits / len(y), "val_loss": loss / len(y)}


def gains(accuracy: dict[str, float], num_layers: int,
          candidates: list[tuple[int, float]]) -> tuple[dict[int, float], dict[tuple[int, float], float]]:
    """The runs' accuracies → ``bias_gain`` (K → gain over the classifier alone, K = 0 → 0) and
    ``weight_gain`` ((layer, ratio) → gain over bias-only)."""
    base = accuracy[CLASSIFIER]
    bias_gain = {0: 0.0}
    bias_gain.update({k: accuracy[f"bias:{k}"] - base for k in bias_depths(num_layers)})
    bias_only = accuracy[f"bias:{num_layers}"]
    weight_gain = {(i, r): accuracy[run.name] - bias_only
                   for (i, r), run in zip(candidates, weight_runs(num_layers, candidates))}
    return bias_gain, weight_gain

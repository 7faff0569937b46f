"""TrainingPipeline: backbone IRModule → training IRModule, as one Sequential.

Before: ``main(x, *params) -> logits`` (``num_input = 1``).
After::

    predict(x, *params) -> logits
    train_step(x, label, *trainable, *optimizer_state, *frozen)
        -> (loss, *trainable_updated, *optimizer_state_updated)
"""

from __future__ import annotations

import tvm
from tvm import relax

from .append_loss import AppendLoss
from .gradient import BuildGradient
from .optimizer import ApplyOptimizer


def TrainingPipeline(trainable: list[str], loss: str, optimizer) -> tvm.transform.Pass:
    """``trainable``: the parameter names that learn, in the order train_step takes them."""
    return tvm.transform.Sequential(
        [
            AppendLoss(trainable, loss),
            BuildGradient(),
            ApplyOptimizer(optimizer),
            relax.transform.DeadCodeElimination(["predict", "train_step"]),
        ],
        name="TinyTrain",
    )

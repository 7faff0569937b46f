"""BuildGradient: the adjoint of ``train_loss`` for its trainable parameters.

A thin front for ``relax.transform.Gradient`` that finds the trainable
parameters by the ``tinytrain.trainable`` attribute AppendLoss left, so it
composes in a ``Sequential`` (Gradient itself wants the ``Var`` objects).

Before: ``train_loss(x, label, *trainable, *frozen) -> loss``.
After, in addition::

    def train_loss_adjoint(x, label, *trainable, *frozen):
        ...                                  # forward, then backward
        return (loss, (grad_trainable_0, grad_trainable_1, ...))
"""

from __future__ import annotations

import tvm
from tvm import relax

from . import op_gradients  # noqa: F401  (registers the missing op gradients)
from .attrs import attr_names


@tvm.transform.module_pass(opt_level=0, name="BuildGradient")
class BuildGradient:
    def __init__(self, func: str = "train_loss"):
        self.func = func

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod[self.func]
        count = len(attr_names(func, "tinytrain.trainable"))
        mod = relax.transform.Gradient(self.func, require_grads=list(func.params[2:2 + count]))(mod)
        adjoint = mod[self.func + "_adjoint"]
        mod[self.func + "_adjoint"] = adjoint.with_attrs(
            {k: func.attrs[k] for k in ("tinytrain.trainable", "tinytrain.loss")}
        )
        return mod

"""AppendLoss: the backbone plus a loss, as the function to differentiate.

Before::

    @R.function
    def main(x, conv0.weight, conv0.bias, linear1.weight, linear1.bias):  # num_input = 1
        with R.dataflow():
            ...
            logits = ...
            R.output(logits)
        return logits

After (``trainable = {"linear1.weight", "linear1.bias"}``, cross-entropy)::

    @R.function
    def train_loss(x, label: R.Tensor((1,), "int64"),
                   linear1.weight, linear1.bias,            # trainable first
                   conv0.weight, conv0.bias):               # then frozen
        with R.dataflow():
            ...                                             # the backbone's bindings
            logits = ...
            logp = R.nn.log_softmax(logits, axis=-1)
            loss = R.nn.nll_loss(logp, label, reduction="mean")
            R.output(loss)
        return loss

``main`` itself is kept, renamed ``predict``. ``mse`` takes a float label
shaped like the logits and gives ``mean((logits - label)^2)``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import op as R

LOSSES = ("cross_entropy", "mse")


@tvm.transform.module_pass(opt_level=0, name="AppendLoss")
class AppendLoss:
    def __init__(self, trainable: list[str], loss: str = "cross_entropy"):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.trainable = list(trainable)
        self.loss = loss

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        backbone = mod["main"]
        func = relax.utils.copy_with_new_vars(backbone)
        x, params = func.params[0], list(func.params[1:])
        by_name = {p.name: p for p in params}
        trainable = [by_name[n] for n in self.trainable]
        frozen = [p for p in params if p.name not in self.trainable]
        logits_ty = func.body.body.ty
        label = relax.Var(
            "label",
            relax.TensorType((int(logits_ty.shape[0]),), "int64")
            if self.loss == "cross_entropy" else logits_ty,
        )
        bb = relax.BlockBuilder()
        with bb.function("train_loss", [x, label, *trainable, *frozen]):
            with bb.dataflow():
                for binding in func.body.blocks[0].bindings:
                    bb.emit_normalized(binding)
                logits = func.body.body
                if self.loss == "cross_entropy":
                    logp = bb.emit(R.nn.log_softmax(logits, axis=-1))
                    loss = bb.emit_output(R.nn.nll_loss(logp, label, reduction="mean"))
                else:
                    diff = bb.emit(R.subtract(logits, label))
                    loss = bb.emit_output(R.mean(R.multiply(diff, diff)))
            bb.emit_func_output(loss)
        out = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"})
        out["predict"] = backbone.with_attr("global_symbol", "predict")
        train = bb.get()["train_loss"]
        out["train_loss"] = train.with_attrs(
            {"num_input": 2, "tinytrain.trainable": self.trainable, "tinytrain.loss": self.loss}
        )
        return out

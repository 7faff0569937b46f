"""QuantizationAwareScaling: rescale the gradients of int8 weights and int32 biases.

The weight of a quantized layer is ``W̄ ≈ W / s_W``; its gradient with respect to
the integer values is ``s_W`` times the float gradient, so the
weight-to-gradient ratio is off by ``s_W⁻²`` (reference.md). QAS multiplies, per
output channel, the weight gradient by ``s_W⁻²`` and the bias gradient by
``s_W⁻²·s_x⁻²``; an SGD step on the integers is then the float step in integer
units. The factors come from the backbone's ``tinytrain.qas`` attribute (the
frontend computed them from the file's scales); a split weight's trainable
slice takes its channels' factors.

Before::

    return (loss, (conv3.weight_adjoint, conv3.bias_adjoint))

After (``conv3.weight``: 4 output channels)::

    gw = R.multiply(conv3.weight_adjoint, R.const(qas_w, shape (4, 1, 1, 1)))
    gb = R.multiply(conv3.bias_adjoint, R.const(qas_b, shape (4,)))
    return (loss, (gw, gb))
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R

from .attrs import attr_names


def qas_factors(name: str, factors: dict[str, list[float]]) -> np.ndarray | None:
    """The factors of a parameter, or of the channels ``[:k]`` of a split weight."""
    if name in factors:
        return np.asarray(factors[name], np.float64)
    if name.endswith("]") and "[:" in name:
        base, k = name[:-1].rsplit("[:", 1)
        if base in factors:
            return np.asarray(factors[base], np.float64)[:int(k)]
    return None


@tvm.transform.module_pass(opt_level=0, name="QuantizationAwareScaling")
class QuantizationAwareScaling:
    def __init__(self, adjoint: str = "train_loss_adjoint"):
        self.adjoint = adjoint

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        predict = mod["predict"]
        if "tinytrain.qas" not in predict.attrs:
            return mod
        factors = {str(k): [float(v) for v in vs] for k, vs in predict.attrs["tinytrain.qas"].items()}
        adj = mod[self.adjoint]
        names = attr_names(adj, "tinytrain.trainable")
        loss, grads = adj.body.body.fields[0], list(adj.body.body.fields[1].fields)
        bb = relax.BlockBuilder()
        with bb.function(self.adjoint, list(adj.params)):
            with bb.dataflow():
                for binding in adj.body.blocks[0].bindings:
                    bb.emit_normalized(binding)
                scaled = []
                for name, g in zip(names, grads):
                    f = qas_factors(name, factors)
                    if f is not None:
                        shape = [len(f)] + [1] * (len(g.ty.shape) - 1)
                        factor = relax.const(f.astype(np.float32).reshape(shape))
                        g = bb.emit_output(R.multiply(g, factor))
                    scaled.append(g)
            bb.emit_func_output(relax.Tuple([loss, relax.Tuple(scaled)]))
        result = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        result[self.adjoint] = bb.get()[self.adjoint].with_attrs(dict(adj.attrs))
        return result

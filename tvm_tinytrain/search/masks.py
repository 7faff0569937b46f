"""One build for every candidate scheme: a scheme as an update mask on a wider training step.

Building an int8 training step takes a minute or two, and the search fine-tunes about a hundred
schemes. So it builds once a step in which every candidate parameter is trainable (the *union*:
``full``, or :func:`union_scheme` of the candidates) and selects a scheme at run time:
``trainer.mask = mask_for(scheme, layers, union)`` (:attr:`HostTrainer.mask
<tvm_tinytrain.trainer.HostTrainer.mask>`). A step then keeps the updates of what the scheme trains
— of a partial weight only its first k output channels — and leaves every other parameter and its
optimizer state as they were.

Why that is the scheme's own training: a parameter's gradient depends on the current values of
all parameters, not on which others learn; frozen ones stay bit-equal under the mask, so every
step computes the gradient the scheme's own build computes, and the optimizer, the QAS scaling and
the integer rounding act per element (stochastic rounding hashes an element's flat index, the same
for the first k rows of a weight and for its k-row slice, and its step's bits).

What ``tests/test_search_masks.py`` proves against a build per scheme (SGD with momentum):

- float ONNX: parameters equal to float32 rounding after 10 steps, every scheme;
- int8 TFLite: int8 weights and int32 biases equal exactly after 10 steps for the classifier,
  the last biases and a depthwise layer at 1/2;
- int8, a standard conv at 1/4: each step, from the same state, equal except the biases of the
  layers below it, within 1 LSB. The scheme's own build sums that conv's input gradient over two
  kernels (k and C − k channels), the union over one: the float gradients below differ in the
  last bits, and stochastic rounding hashes those bits. (The split weight's own rows are exact
  where LLVM compiles the hash as written: not yet for every shape, see the strict xfail there.)

Untrained parameters stay bit-equal to their initial values in every case.
"""

from __future__ import annotations

from relay_passes.sparse_update import trainable_slice_name

from ..errors import SchemeError
from ..layers import Layer
from ..scheme import resolve


def mask_for(scheme, layers: list[Layer], union: dict[str, int | None]) -> dict[str, int | None]:
    """``scheme`` as a mask on a trainer built with the resolved ``union`` (``resolve(union, layers)``):
    ``{trainable name: channels | None}``, keyed by the trainer's names (``w[:k]`` for a weight the
    union itself splits). A SchemeError when the scheme trains something the union does not."""
    mask: dict[str, int | None] = {}
    for name, channels in resolve(scheme, layers).items():
        if name not in union:
            raise SchemeError(f"the scheme trains {name}, which the shared training step does not: "
                              "build that step with a union holding it (e.g. 'full')")
        have = union[name]
        if have is None:
            mask[name] = channels
            continue
        if channels is None or channels > have:
            raise SchemeError(f"the scheme trains {'all' if channels is None else channels} output channels "
                              f"of {name}, the shared training step only {have}: widen its union")
        mask[trainable_slice_name(name, have)] = None if channels == have else channels
    return mask


def union_scheme(schemes, layers: list[Layer]) -> dict:
    """A scheme (the dict form) that trains everything any of ``schemes`` trains: the biases of the
    last layers down to the earliest bias any trains, each weight at the widest ratio any asks.
    Build the shared step with it, and ``mask_for`` each candidate on its ``resolve``."""
    n = len(layers)
    by_name = {}
    for layer in layers:
        by_name[layer.weight] = ("weight", layer)
        if layer.bias:
            by_name[layer.bias] = ("bias", layer)
    first_bias, widest = n, {}
    for scheme in schemes:
        for name, channels in resolve(scheme, layers).items():
            kind, layer = by_name[name]
            if kind == "bias":
                first_bias = min(first_bias, layer.index)
                continue
            k = layer.out_channels if channels is None else channels
            widest[layer.index] = max(widest.get(layer.index, 0), k)
    weights = {str(i): k / layers[i].out_channels for i, k in sorted(widest.items())}
    return {"bias": {"last": n - first_bias}, "weights": weights}

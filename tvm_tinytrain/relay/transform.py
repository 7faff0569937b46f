"""``TinyTrain``: the whole compile-time training construction as one TVM module pass."""

from __future__ import annotations

import tvm
import tvm_ffi

from relay_passes import SGD, TrainingPipeline

from ..errors import SchemeError, TinyTrainError
from ..layers import layer_table
from ..scheme import check_form, resolve

# A Python exception raised inside a module pass crosses TVM's FFI and comes back
# as a RuntimeError unless its class is registered: keep SchemeError a SchemeError
# (what the CLI catches) when resolve() rejects a scheme for the model at hand.
for _cls in (TinyTrainError, SchemeError):
    tvm_ffi.register_error(f"tinytrain.{_cls.__name__}", _cls)


def TinyTrain(
    scheme="full", loss: str = "cross_entropy", optimizer=None, reorder: bool = True,
    chunk_bytes: int | None = 16 * 1024, qas: bool = True, integer_rounding: str = "stochastic",
) -> tvm.transform.Pass:
    """Backbone (``main(x, *params) -> logits``) → ``predict`` + ``train_step``.

    ``train_step(x, label, *trainable, *optimizer_state, learning_rate, *frozen) ->
    (loss, *trainable_updated, *optimizer_state_updated)``. ``scheme`` names which
    parameters learn (a preset: full, last-layer, bias-only, last-k:N; a dict; a .json
    path — see ``tvm_tinytrain.scheme``); ``reorder=False`` skips the memory-saving
    operator reordering (for comparison); frozen inverted bottlenecks whose middle
    tensor is over ``chunk_bytes`` run a few channels at a time (None: never); ``loss`` is
    ``cross_entropy`` (integer label) or ``mse`` (label shaped like the output);
    ``optimizer`` is ``tvm_tinytrain.SGD(...)`` or ``tvm_tinytrain.Adam(...)``. On an int8
    backbone, ``qas`` (default) applies Quantization-Aware Scaling to the gradients of
    the int8 weights and int32 biases; ``qas=False`` trains without it, to compare. After each
    update they are rounded back to integers stochastically (unbiased: a step smaller than
    one unit still moves the weight with the right probability); ``integer_rounding="nearest"``
    rounds to nearest (steps under half a unit are lost).
    """
    optimizer = optimizer if optimizer is not None else SGD(lr=0.01)
    check_form(scheme)
    if loss not in ("cross_entropy", "mse"):
        raise SchemeError(f"unknown loss {loss!r}; choose cross_entropy or mse")
    if integer_rounding not in ("stochastic", "nearest"):
        raise SchemeError(f"unknown integer_rounding {integer_rounding!r}; choose stochastic or nearest")
    if not hasattr(optimizer, "step"):
        raise SchemeError(f"optimizer must be tvm_tinytrain.SGD(...) or Adam(...), not {optimizer!r}")

    @tvm.transform.module_pass(opt_level=0, name="TinyTrain")
    def tinytrain(mod: tvm.IRModule, ctx) -> tvm.IRModule:
        trainable = resolve(scheme, layer_table(mod))
        return TrainingPipeline(trainable, loss, optimizer, reorder, chunk_bytes, qas,
                                integer_rounding)(mod)

    return tinytrain

"""TrainingPipeline: backbone IRModule → training IRModule, as one Sequential.

Sparse update (partial channels split off), loss, gradient, QAS (int8 layers),
optimizer, dead-code removal, then the memory-saving reorder.

Before: ``main(x, *params) -> logits`` (``num_input = 1``).
After::

    predict(x, *params) -> logits
    train_step(x, label, *trainable, *optimizer_state, learning_rate, *frozen)
        -> (loss, *trainable_updated, *optimizer_state_updated)
"""

from __future__ import annotations

import tvm
from tvm import relax

from .append_loss import AppendLoss
from .band_rows import BandFrozenChains
from .chunk_bottlenecks import ChunkBottlenecks
from .dense import DenseWithoutTranspose, FuseLinearUpdate
from .fuse_update import FuseWeightUpdate
from .gradient import BuildGradient
from .optimizer import ApplyOptimizer
from .plain_calls import PlainTIRCalls
from .qas import QuantizationAwareScaling
from .reorder import ReorderForMemory
from .sparse_update import SplitPartialWeights, trainable_slice_name
from .through_bias import BiasFromThroughRows


def TrainingPipeline(
    trainable: dict[str, int | None], loss: str, optimizer, reorder: bool = True,
    chunk_bytes: int | None = 16 * 1024, qas: bool = True, integer_rounding: str = "stochastic",
) -> tvm.transform.Pass:
    """``trainable``: parameter name → output channels that learn (None: all), in the
    order train_step takes them. ``reorder=False`` keeps Gradient's order (all
    gradients, then all updates), to measure what reordering saves. Frozen
    bottlenecks whose middle tensor exceeds ``chunk_bytes`` run in channel chunks
    (None: never). ``qas`` rescales the gradients of int8 layers (a float backbone
    has none); ``integer_rounding`` is how int8 weights and int32 biases are rounded
    after an update (``stochastic`` or ``nearest``)."""
    partial = {name: k for name, k in trainable.items() if k is not None}
    names = [trainable_slice_name(n, k) if k is not None else n for n, k in trainable.items()]
    chunking = []
    if chunk_bytes is not None:
        chunking = [_ChunkFrozen(set(trainable), chunk_bytes)]
    passes = [
        *chunking,
        SplitPartialWeights(partial),
        AppendLoss(names, loss),
        BuildGradient(),
        *([QuantizationAwareScaling()] if qas else []),
        ApplyOptimizer(optimizer, integer_rounding=integer_rounding),
        relax.transform.CanonicalizeBindings(),  # (g_x, g_w)[1] → g_w: an unused g_x dies
        relax.transform.DeadCodeElimination(["predict", "train_step"]),
        BiasFromThroughRows(),
        FuseWeightUpdate(),
        FuseLinearUpdate,
        DenseWithoutTranspose,
        PlainTIRCalls,
        relax.transform.DeadCodeElimination(["predict", "train_step"]),  # unused gradient kernels
    ]
    if reorder:
        passes.append(ReorderForMemory())
    return tvm.transform.Sequential(passes, name="TinyTrain")


@tvm.transform.module_pass(opt_level=0, name="ChunkFrozenBottlenecks")
class _ChunkFrozen:
    """ChunkBottlenecks (float) and BandFrozenChains (int8) on every parameter of
    ``main`` that does not learn."""

    def __init__(self, trainable: set[str], chunk_bytes: int):
        self.trainable, self.chunk_bytes = trainable, chunk_bytes

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        frozen = {p.name for p in mod["main"].params[1:]} - self.trainable
        mod = ChunkBottlenecks(frozen, self.chunk_bytes)(mod)
        return BandFrozenChains(frozen, self.chunk_bytes)(mod)

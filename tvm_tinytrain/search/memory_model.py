"""The search's memory model: the planner's total SRAM of a scheme, as a sum calibrated on a few plans.

The exact figure is the planner's (``tinytrain memory``'s total SRAM, :func:`planned_total`), a few
seconds per scheme: too slow for the thousands of candidates a search weighs. So::

    cost(k, ratios) = A[max(k, N − min i)] + Σ_i W[(i, r_i)]        W[(i, r)] = P_i(r) + a_i(r)

1. ``A[d]``: the planner's total of the biases of the last d layers + the classifier (d = 0: the
   classifier alone). A weight of layer i needs the backward pass to reach layer i, as the biases of
   the last N − i layers do: the depth that prices a candidate is the deeper of its bias depth and
   its deepest weight's ``N − i`` (without it, a weight far below a shallow bias depth looked cheap:
   ResNet-8 int8, bias 3 + weights of layers 3-8 modelled 60 KB, planned 147 KB; with it, 140 KB);
2. ``P_i(r)``: the exact bytes of layer i's trainable weight slice at ratio r (the channels
   ``scheme.resolve`` gives) and of its optimizer state (as ``relay_passes.optimizer`` makes it);
3. ``a_i(r)``: what else the planner needs to train that slice (arena, rollback copy), measured where
   the backward pass just reaches layer i: plan(biases of the last N − i layers + W_i at r) − A[N − i]
   − P_i(r). Signed: training a slice can also shrink the arena.

Exact for the calibrated schemes themselves; for several layers at once it assumes their extras add
up, which the planner's peak does not promise (ResNet-8 and VWW int8: within about −20 % .. +60 %),
so a search's answer is always planned again (``evolution.fit_to_planner``). A ratio left out of
calibration borrows a_i of the layer's nearest calibrated ratio (in channels): a guess, re-checked
the same way. A depth left out of calibration is priced at the next deeper calibrated one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the search itself runs without TVM
    from ..layers import Layer

RATIOS = (0.125, 0.25, 0.5, 1.0)


def scheme_of(k: int, ratios: dict[int, float] | None = None) -> dict:
    """The scheme dict of the biases of the last ``k`` layers, the classifier and ``ratios``
    (layer → ratio of its output channels): the schemes of the contribution runs and of the plans."""
    scheme: dict = {"bias": {"last": k}} if k else {}
    if ratios:
        scheme["weights"] = {str(i): float(r) for i, r in sorted(ratios.items())}
    scheme["classifier"] = True
    return scheme


def key(scheme: dict) -> str:
    """A scheme's canonical JSON: the key of the ``plans`` mapping."""
    return json.dumps(scheme, sort_keys=True)


def parse(scheme: dict) -> tuple[int, dict[int, float]]:
    """The inverse of :func:`scheme_of`: (k, {layer: ratio})."""
    k = int((scheme.get("bias") or {}).get("last", 0))
    return k, {int(i): float(r) for i, r in (scheme.get("weights") or {}).items()}


def calibration_schemes(ks, layers_idx, num_layers: int, ratios=RATIOS) -> list[dict]:
    """The schemes :func:`fit` needs planned: the bias depths (``ks``, 0 — the classifier alone, the
    smallest trainable scheme —, ``num_layers`` and each candidate layer's reach ``num_layers − i``),
    then each candidate layer's weights at each ratio with the biases down to that layer."""
    layers_idx = list(layers_idx)
    schemes = [scheme_of(k) for k in depths(ks, num_layers, layers_idx)]
    schemes += [scheme_of(num_layers - i, {i: r}) for i in layers_idx for r in ratios]
    return schemes


def depths(ks, num_layers: int, layers_idx=()) -> list[int]:
    """The bias depths the model is calibrated on: ``ks``, 0, ``num_layers`` and each layer's reach."""
    return sorted({0, *ks, num_layers, *(num_layers - i for i in layers_idx)})


def trained_channels(layer: Layer, ratio: float) -> int:
    """The output channels a ratio trains, rounded as ``scheme.resolve`` rounds them."""
    from relay_passes.sparse_update import rounded_channels

    channels = math.ceil(ratio * layer.out_channels - 1e-9)
    return min(layer.out_channels, rounded_channels(layer.weight_shape, layer.groups, channels))


def slice_bytes(layer: Layer, ratio: float, dtype: str, optimizer) -> int:
    """P_i(r): the trainable slice (its own dtype: an int8 weight is 1 byte) and its optimizer state
    (float32 for an integer weight, else the weight's dtype; a state named ``*pow`` is one scalar, as
    ``relay_passes.optimizer._state_type`` makes it)."""
    elements = trained_channels(layer, ratio) * int(np.prod(layer.weight_shape[1:]))
    size = np.dtype(dtype).itemsize
    state_size = 4 if dtype in ("int8", "int32") else size
    state = 0
    for name in optimizer.state(layer.weight):
        state += state_size if name.endswith("pow") else elements * state_size
    return elements * size + state


@dataclass
class MemoryModel:
    base: dict[int, int]  # d -> A[d], the planner's total for bias-last-d + classifier
    weight: dict[tuple[int, float], int]  # (layer, ratio) -> P_i(r) + a_i(r)
    num_layers: int  # N: layer i's weights need the depth N - i

    def depth(self, k: int, ratios: dict[int, float]) -> int:
        """The calibrated depth that prices a candidate: ``k``, or the next calibrated depth at or
        past its deepest weight's reach when that is deeper."""
        if k not in self.base:
            raise KeyError(f"bias depth {k} was not calibrated; calibrated: {sorted(self.base)}")
        reach = self.num_layers - min(ratios) if ratios else 0
        if reach <= k:
            return k
        return min((d for d in self.base if d >= reach), default=max(self.base))

    def cost(self, k: int, ratios: dict[int, float]) -> int:
        """The modelled total SRAM, bytes, of bias-last-k + the classifier + ``ratios``."""
        total = self.base[self.depth(k, ratios)]
        for i, r in ratios.items():
            if (i, r) not in self.weight:
                raise KeyError(f"layer {i} at ratio {r:g} was not calibrated")
            total += self.weight[(i, r)]
        return total

    def as_dict(self) -> dict:
        return {"base": {str(k): v for k, v in sorted(self.base.items())},
                "weight": [[i, r, v] for (i, r), v in sorted(self.weight.items())],
                "num_layers": self.num_layers}

    @classmethod
    def from_dict(cls, data: dict) -> MemoryModel:
        return cls({int(k): int(v) for k, v in data["base"].items()},
                   {(int(i), float(r)): int(v) for i, r, v in data["weight"]}, int(data["num_layers"]))

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> MemoryModel:
        return cls.from_dict(json.loads(text))


def fit(plans: dict[str, int], ks, layers: list[Layer], ratios, optimizer, *, dtypes: dict[str, str],
        layers_idx=None) -> MemoryModel:
    """The model from the planner's totals of :func:`calibration_schemes` (``plans``: canonical JSON →
    bytes; the same ``ks`` and ``layers_idx``). ``dtypes``: parameter name → dtype
    (:func:`param_dtypes`); ``layers_idx``: the candidate layers (default: all but the classifier). A
    (layer, ratio) whose plan is missing borrows a_i of the layer's nearest planned ratio; a layer
    with no plan at all is left out."""
    n = len(layers)
    layers_idx = list(range(n - 1) if layers_idx is None else layers_idx)
    missing = [k for k in depths(ks, n, layers_idx) if key(scheme_of(k)) not in plans]
    if missing:
        raise KeyError(f"no plan of bias depth(s) {missing}: plan calibration_schemes() first")
    base = {k: int(plans[key(scheme_of(k))]) for k in depths(ks, n, layers_idx)}
    weight: dict[tuple[int, float], int] = {}
    for i in layers_idx:
        layer = layers[i]
        dtype = dtypes[layer.weight]
        extra = {}  # ratio -> a_i(r), for the planned ratios
        for r in ratios:
            total = plans.get(key(scheme_of(n - i, {i: r})))
            if total is not None:
                extra[r] = int(total) - base[n - i] - slice_bytes(layer, r, dtype, optimizer)
        if not extra:
            continue
        for r in ratios:
            channels = trained_channels(layer, r)
            nearest = min(extra, key=lambda p: (abs(trained_channels(layer, p) - channels), p))
            weight[(i, float(r))] = slice_bytes(layer, r, dtype, optimizer) + extra[nearest]
    return MemoryModel(base, weight, n)


def param_dtypes(mod) -> dict[str, str]:
    """Parameter name → dtype of a backbone (``load_model``'s module)."""
    from ..layers import backbone

    return {p.name: str(p.ty.dtype) for p in backbone(mod).params[1:]}


def planned_total(mod, scheme, *, qas: bool = True, optimizer=None, loss: str = "cross_entropy") -> int:
    """The planner's total SRAM of one training step of ``scheme``, bytes: ``tinytrain memory``'s
    "total SRAM" (arena + trainable + optimizer state + rollback copy)."""
    from ..memory_report import memory_report
    from ..relay.transform import TinyTrain

    train_mod = TinyTrain(scheme=scheme, loss=loss, optimizer=optimizer, qas=qas)(mod)
    return memory_report(train_mod, compare_tvm=False).total_sram_bytes

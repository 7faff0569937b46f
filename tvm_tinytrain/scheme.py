"""Which parameters learn: sparse-update schemes resolved against a model's layers.

Presets: ``full`` (every weight and bias), ``last-layer`` (the classifier),
``bias-only`` (every bias and the classifier), ``last-k:N`` (weights and
biases of the last N layers). The result is the neutral mapping the passes
take: parameter name → output channels to update (None = all).
"""

from __future__ import annotations

from .errors import SchemeError
from .layers import Layer

PRESETS = ("full", "last-layer", "bias-only", "last-k:N")


def resolve(scheme: str, layers: list[Layer]) -> dict[str, int | None]:
    """Parameter name → channels to update, in layer order (weights before biases)."""
    if not isinstance(scheme, str):
        raise SchemeError(f"scheme must be a preset name ({', '.join(PRESETS)}), not {scheme!r}")
    n = len(layers)
    if scheme == "full":
        chosen = {i: (True, True) for i in range(n)}
    elif scheme == "last-layer":
        chosen = {n - 1: (True, True)}
    elif scheme == "bias-only":
        chosen = {i: (i == n - 1, True) for i in range(n)}
    elif scheme.startswith("last-k:"):
        try:
            k = int(scheme.split(":", 1)[1])
        except ValueError:
            k = 0
        if not 1 <= k <= n:
            raise SchemeError(f"scheme {scheme!r}: N must be an integer in 1..{n} for this model")
        chosen = {i: (True, True) for i in range(n - k, n)}
    else:
        raise SchemeError(f"unknown scheme {scheme!r}; presets: {', '.join(PRESETS)}")
    trainable: dict[str, int | None] = {}
    for i, (weight, bias) in sorted(chosen.items()):
        if weight:
            trainable[layers[i].weight] = None
        if bias and layers[i].bias:
            trainable[layers[i].bias] = None
    if not trainable:
        raise SchemeError(f"scheme {scheme!r} trains nothing in this model")
    return trainable

"""Small readers of Relax IR that the passes and the lowering share."""

from __future__ import annotations

import numpy as np
from tvm import relax


def use_counts(func: relax.Function) -> dict[relax.Var, int]:
    """How many bindings (and the function's result) read each var of ``func``'s one block."""
    uses: dict[relax.Var, int] = {}
    for b in func.body.blocks[0].bindings:
        for v in relax.analysis.free_vars(b.value):
            uses[v] = uses.get(v, 0) + 1
    for v in relax.analysis.free_vars(func.body.body):
        uses[v] = uses.get(v, 0) + 1
    return uses


def constant_value(const) -> np.ndarray:
    """A Relax constant's data (``GenericConst.value``: a tensor, or a Python number for a scalar)."""
    value = const.value
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)

"""The function attributes the passes leave on ``train_step`` for the tools after them.

``tinytrain.trainable`` (parameter names, in train_step's order), ``tinytrain.state``
(optimizer state names), ``tinytrain.state_init`` (name → initial fill value),
``tinytrain.loss``, ``tinytrain.split`` (weight → trainable channels, on predict),
``tinytrain.reordered``.
"""

from __future__ import annotations

from tvm import relax


def attr_names(func: relax.Function, attr: str) -> list[str]:
    """The list of names stored under ``attr``, or [] when the function has none."""
    return [str(n) for n in func.attrs[attr]] if func.attrs is not None and attr in func.attrs else []

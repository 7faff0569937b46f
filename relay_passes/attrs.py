"""The function attributes the passes leave on ``train_step`` for the tools after them.

``tinytrain.trainable`` (parameter names, in train_step's order), ``tinytrain.state``
(optimizer state names), ``tinytrain.state_init`` (name → initial fill value),
``tinytrain.loss``, ``tinytrain.split`` (weight → trainable channels, on predict),
``tinytrain.reordered``.

The last state is always :data:`LEARNING_RATE`, a float32 scalar the step reads and never
writes: ``train_step`` returns the new value of every other state, not of this one, so a
schedule can set it between steps (``HostTrainer.learning_rate``, ``tinytrain_set_learning_rate``).
"""

from __future__ import annotations

from tvm import relax

LEARNING_RATE = "learning_rate"


def attr_names(func: relax.Function, attr: str) -> list[str]:
    """The list of names stored under ``attr``, or [] when the function has none."""
    return [str(n) for n in func.attrs[attr]] if func.attrs is not None and attr in func.attrs else []


def updated_state(func: relax.Function) -> list[str]:
    """The state names whose new values ``train_step`` returns: all but the learning rate."""
    return [n for n in attr_names(func, "tinytrain.state") if n != LEARNING_RATE]


def learning_rate_var(func: relax.Function) -> relax.Var | None:
    """``func``'s learning-rate parameter, or None."""
    return next((p for p in func.params if p.name == LEARNING_RATE), None)

"""The optimizer, inside the graph: ``ApplyOptimizer`` turns gradients into updates.

Before (what ``relax.transform.Gradient("train_loss")`` returns)::

    @R.function
    def train_loss_adjoint(x, label, w, b, *frozen):
        with R.dataflow():
            ...
            R.output(loss, w_adjoint_out, b_adjoint_out)
        return (loss, (w_adjoint_out, b_adjoint_out))

After, with ``SGD(lr=0.1, momentum=0.9)``::

    @R.function
    def train_step(x, label, w, b, w.momentum, b.momentum, learning_rate, *frozen):
        with R.dataflow():
            ...                                   # the adjoint's bindings
            w.momentum_new = 0.9 * w.momentum + w_adjoint_out
            w_new = w - learning_rate * w.momentum_new    # learning_rate starts at 0.1
            ...
            R.output(loss, w_new, b_new, w.momentum_new, b.momentum_new)
        return (loss, w_new, b_new, w.momentum_new, b.momentum_new)

The learning rate is not a constant of the graph but its last state,
``learning_rate`` (a float32 scalar, filled with ``lr``), read and never
written: ``train_step`` returns no new value for it, and the trainer or the
device sets it between steps for a schedule (the paper uses cosine decay)::

    def train_step(x, label, w, b, w.momentum, b.momentum, learning_rate, *frozen):
        ...
            w_new = w - learning_rate * w.momentum_new

The function records its state tensors and their initial fill values in the
attributes ``tinytrain.state`` and ``tinytrain.state_init``.

An integer parameter (a quantized layer's int8 weight or int32 bias) is updated
in float32 and rounded back, so it stays an integer tensor; its optimizer state
is float32::

    w_new = R.call_tir(integer_update, (w, learning_rate * g))   # int8(clip(round(w - lr·g), -127, 127))

rounded stochastically by default (``integer_rounding="nearest"`` to compare; see
``int8_arith.integer_step``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import tvm
from tvm import relax, te
from tvm.relax import op as R

from .attrs import LEARNING_RATE, attr_names
from .int8_arith import ROUNDINGS, integer_step
from .int8_ops import emit_tagged_kernel


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(what: str, value) -> None:
    """A ValueError unless ``value`` is a finite number > 0 (a learning rate, Adam's eps)."""
    if not (_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


def check_fraction(what: str, value) -> None:
    """A ValueError unless ``value`` is a number in [0, 1) (momentum, Adam's betas)."""
    if not (_real(value) and 0 <= value < 1):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")


@dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent, with optional momentum: v ← μv + g; w ← w − lr·v."""

    lr: float = 0.01
    momentum: float = 0.0

    def __post_init__(self):
        check_positive("SGD learning rate", self.lr)
        check_fraction("SGD momentum", self.momentum)

    def state(self, param: str) -> dict[str, float]:
        return {f"{param}.momentum": 0.0} if self.momentum else {}

    def step(self, bb, g, state: list, lr: relax.Expr) -> tuple:
        """The amount to subtract from the parameter, and the new state; ``lr`` is the
        learning-rate scalar."""
        if not self.momentum:
            return bb.emit(R.multiply(lr, g)), []
        v = bb.emit(R.add(R.multiply(relax.const(self.momentum, g.ty.dtype), state[0]), g))
        return bb.emit(R.multiply(lr, v)), [v]


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba), bias-corrected through running powers of β1, β2."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        check_positive("Adam learning rate", self.lr)
        check_fraction("Adam beta1", self.beta1)
        check_fraction("Adam beta2", self.beta2)
        check_positive("Adam eps", self.eps)

    def state(self, param: str) -> dict[str, float]:
        return {f"{param}.adam_m": 0.0, f"{param}.adam_v": 0.0,
                f"{param}.adam_b1pow": 1.0, f"{param}.adam_b2pow": 1.0}

    def step(self, bb, g, state: list, lr: relax.Expr) -> tuple:
        def c(v):
            return relax.const(v, g.ty.dtype)

        m, v, b1pow, b2pow = state
        m = bb.emit(R.add(R.multiply(c(self.beta1), m), R.multiply(c(1 - self.beta1), g)))
        v = bb.emit(R.add(R.multiply(c(self.beta2), v),
                          R.multiply(c(1 - self.beta2), R.multiply(g, g))))
        b1pow = bb.emit(R.multiply(b1pow, c(self.beta1)))
        b2pow = bb.emit(R.multiply(b2pow, c(self.beta2)))
        m_hat = R.divide(m, R.subtract(c(1.0), b1pow))
        v_hat = R.divide(v, R.subtract(c(1.0), b2pow))
        step = R.divide(R.multiply(lr, m_hat), R.add(R.sqrt(v_hat), c(self.eps)))
        return bb.emit(step), [m, v, b1pow, b2pow]


# an integer parameter's range after an update: int8 weights are symmetric, as TFLite's. The int32
# bound is a float32 that TVM's C printer (7 significant digits, 2.147483e+09f) reads back exactly:
# 2147483520 printed as 2.147484e+09f became 2^31, and its cast to int32 was undefined behaviour
INTEGER_RANGE = {"int8": (-127.0, 127.0), "int32": (-2147483008.0, 2147483008.0)}


def _float_dtype(param: relax.Var) -> str:
    return "float32" if str(param.ty.dtype) in INTEGER_RANGE else str(param.ty.dtype)


def _state_type(name: str, param: relax.Var) -> relax.TensorType:
    if name.endswith("pow"):
        return relax.TensorType((), _float_dtype(param))
    return relax.TensorType(param.ty.shape, _float_dtype(param))


def _integer_update(w, delta, lo: float, hi: float, rounding: str):
    """``w − delta`` rounded back to the integer type, one kernel: no float copy of w."""
    return te.compute(w.shape, lambda *i: integer_step(w[i], delta[i], i, w.shape, lo, hi, rounding),
                      name="w_new")


def _update(optimizer, bb, w, g, state, lr, rounding: str = "stochastic"):
    """``w − optimizer.step(...)``; an integer parameter is rounded back to its type."""
    if str(g.ty.dtype) != "float32":
        lr = bb.emit(R.astype(lr, g.ty.dtype))
    delta, s_new = optimizer.step(bb, g, state, lr)
    dtype = str(w.ty.dtype)
    if dtype not in INTEGER_RANGE:
        return bb.emit(R.subtract(w, delta)), s_new
    lo, hi = INTEGER_RANGE[dtype]
    return emit_tagged_kernel(bb, lambda wt, dt: _integer_update(wt, dt, lo, hi, rounding), [w, delta],
                              "tinytrain_integer_update", {"lo": lo, "hi": hi, "rounding": rounding}), s_new


@tvm.transform.module_pass(opt_level=0, name="ApplyOptimizer")
class ApplyOptimizer:
    def __init__(self, optimizer, adjoint: str = "train_loss_adjoint", name: str = "train_step",
                 integer_rounding: str = "stochastic"):
        if integer_rounding not in ROUNDINGS:
            raise ValueError(f"integer_rounding must be one of {ROUNDINGS}, not {integer_rounding!r}")
        self.optimizer, self.adjoint, self.name = optimizer, adjoint, name
        self.rounding = integer_rounding

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        adj = mod[self.adjoint]
        trainable_names = attr_names(adj, "tinytrain.trainable")
        x, label = adj.params[:2]
        trainable = list(adj.params[2:2 + len(trainable_names)])
        frozen = list(adj.params[2 + len(trainable_names):])
        loss, grads = adj.body.body.fields[0], list(adj.body.body.fields[1].fields)
        init: dict[str, float] = {}
        state_vars: list[list[relax.Var]] = []
        for param in trainable:
            names = self.optimizer.state(param.name)
            init.update(names)
            state_vars.append([relax.Var(n, _state_type(n, param)) for n in names])
        if any(p.name == LEARNING_RATE for p in adj.params):  # state names all hold a "."
            raise ValueError(f"a parameter of the model is named {LEARNING_RATE!r}, the name of the "
                             "optimizer's learning-rate state: rename it in the model")
        lr = relax.Var(LEARNING_RATE, relax.TensorType((), "float32"))
        init[LEARNING_RATE] = float(self.optimizer.lr)
        flat_state = [v for group in state_vars for v in group]
        bb = relax.BlockBuilder(mod)
        with bb.function(self.name, [x, label, *trainable, *flat_state, lr, *frozen]):
            with bb.dataflow():
                for binding in adj.body.blocks[0].bindings:
                    bb.emit_normalized(binding)
                new_params, new_state = [], []
                for w, g, state in zip(trainable, grads, state_vars):
                    w_new, s_new = _update(self.optimizer, bb, w, g, state, lr, self.rounding)
                    new_params.append(w_new)
                    new_state.extend(s_new)
                out = bb.emit_output(relax.Tuple([loss, *new_params, *new_state]))
            bb.emit_func_output(out)
        func = bb.get()[self.name].with_attrs({
            "num_input": 2,
            "tinytrain.trainable": trainable_names,
            "tinytrain.state": list(init),
            "tinytrain.state_init": {k: str(v) for k, v in init.items()},
            "tinytrain.loss": adj.attrs["tinytrain.loss"],
        })
        keep = {gv: f for gv, f in bb.get().functions.items()  # with the kernels update added
                if gv.name_hint not in (self.adjoint, "train_loss", self.name)}
        out_mod = tvm.IRModule(keep)
        out_mod[self.name] = func
        return out_mod

"""Loss and gradients of an imported model, straight from the training passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax

import tvm_tinytrain as tt
from relay_passes import AppendLoss, BuildGradient


class LossAndGrad:
    """``loss(params)`` and ``grads(params)`` of a model file, for one sample."""

    def __init__(self, path: Path, x, label, dtype: str = "float64", loss: str = "cross_entropy",
                 wrt_input: bool = False):
        self.mod, self.params = tt.load_model(path, dtype=dtype)
        self.names = list(self.params)
        mod = AppendLoss(self.names, loss)(self.mod)
        if wrt_input:  # the input's gradient first, then the parameters'
            func = mod["train_loss"]
            wrt = [func.params[0], *func.params[2:]]
            mod = relax.transform.Gradient("train_loss", require_grads=wrt)(mod)
            self.names = ["<input>", *self.names]
        else:
            mod = BuildGradient()(mod)
        self.vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        self.dtype = dtype
        self.x = np.asarray(x, dtype).reshape([int(d) for d in self.mod["main"].params[0].ty.shape])
        self.label = np.asarray([label], np.int64) if loss == "cross_entropy" else np.asarray(label)

    def _args(self, params):
        return [tvm.runtime.tensor(a) for a in
                (self.x, self.label, *[np.asarray(params[n], self.dtype) for n in self.params])]

    def loss(self, params) -> float:
        return float(self.vm["train_loss"](*self._args(params)).numpy())

    def grads(self, params) -> dict[str, np.ndarray]:
        out = self.vm["train_loss_adjoint"](*self._args(params))
        return {n: g.numpy() for n, g in zip(self.names, out[1])}


def finite_difference_check(fn: LossAndGrad, per_tensor: int = 6, eps: float = 1e-6, seed: int = 0):
    """Worst relative error of the analytic gradient vs central differences (float64)."""
    rng = np.random.default_rng(seed)
    params = {n: v.astype(np.float64) for n, v in fn.params.items()}
    grads = fn.grads(params)
    worst = 0.0
    for name in fn.names:
        scale = max(np.abs(grads[name]).max(), 1e-12)
        for _ in range(per_tensor):
            idx = tuple(int(rng.integers(0, s)) for s in params[name].shape)
            plus = {**params, name: params[name].copy()}
            plus[name][idx] += eps
            minus = {**params, name: params[name].copy()}
            minus[name][idx] -= eps
            numeric = (fn.loss(plus) - fn.loss(minus)) / (2 * eps)
            err = abs(numeric - grads[name][idx]) / max(abs(numeric), abs(grads[name][idx]), 1e-3 * scale)
            worst = max(worst, err)
    return worst

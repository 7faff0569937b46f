"""BiasFromThroughRows: a depthwise layer's bias gradient summed from the chunks its
expansion's backward makes, not from a second pass over the projection.

In an inverted bottleneck ``E → D → P`` (1×1, depthwise, 1×1), D's clamped output gradient
``[lo < y < hi]·M[c]·Σ_o g_P[o]·w_P[o, c]`` is a full multiply-add pass over P's weight. D's
bias gradient is its sum over the pixels of each channel (a kernel tagged ``THROUGH_BIAS``),
and E's chunked backward makes the same values a few channels at a time (kernels tagged
``THROUGH_ROWS``, over the same four arguments). Where the chunks cover every channel, the
bias is summed from them (``H·W`` adds per channel) and the tagged kernel dies::

    g_b = call_tir(qconv_bias_grad, [mask, k, g, w])         # O·C·H·W multiply-adds
    g_d0 = call_tir(qgrad_through_rows, [mask, k, g, w])     # channels 0 .. s
    ...
becomes
    g_d0 = call_tir(qgrad_through_rows, [mask, k, g, w])
    s0 = call_tir(qconv_bias_grad_rows, [g_d0])              # its channels' sums
    ...
    g_b = concat([s0, s1, ...])

Each sum adds the same float values in the same order as the tagged kernel (both kernels
make them with the same TIR), so the bias gradient keeps its bits. It runs after
CanonicalizeBindings (the gradient tuple that held ``g_b`` folded away), on a function
whose every reader of ``g_b`` comes after its last chunk (else it leaves that bias alone).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax import op as R

from .exprs import with_bindings
from .int8_grad_kernels import THROUGH_BIAS, THROUGH_ROWS, channel_sums_te
from .int8_ops import kernel_tag, make_kernel


def _same_args(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.same_as(y) or tvm_ffi.structural_equal(x, y) for x, y in zip(a, b))


def _chunks_covering(mod, bindings: list, bias_call, channels: int) -> list[int] | None:
    """Positions (in channel order) of the ``THROUGH_ROWS`` bindings over ``bias_call``'s
    arguments that cover channels ``0 .. channels`` once each, or None."""
    args = list(bias_call.args[1].fields)
    found = {}
    for i, b in enumerate(bindings):
        tag, kw = kernel_tag(mod, b.value)
        if tag == THROUGH_ROWS and _same_args(list(b.value.args[1].fields), args):
            found[int(kw["c0"])] = (i, int(kw["step"]))
    positions, c = [], 0
    while c in found:
        i, step = found.pop(c)
        positions.append(i)
        c += step
    return positions if c == channels and not found else None


def _first_use(bindings: list, var) -> int:
    """The position of the first binding that reads ``var`` (past the end: none does)."""
    for i, b in enumerate(bindings):
        if any(v.same_as(var) for v in relax.analysis.free_vars(b.value)):
            return i
    return len(bindings)


@tvm.transform.module_pass(opt_level=0, name="BiasFromThroughRows")
class BiasFromThroughRows:
    def __init__(self, func: str = "train_step"):
        self.func = func

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if self.func not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        func = mod[self.func]
        bindings = list(func.body.blocks[0].bindings)
        plans = {}  # bias binding position → chunk positions
        for i, b in enumerate(bindings):
            tag, kw = kernel_tag(mod, b.value)
            if tag != THROUGH_BIAS:
                continue
            chunks = _chunks_covering(mod, bindings, b.value, int(kw["channels"]))
            if chunks and max(chunks) < _first_use(bindings, b.var):
                plans[i] = chunks
        if not plans:
            return mod
        bb = relax.BlockBuilder(tvm.IRModule(dict(mod.functions), attrs=mod.attrs))  # (not into mod)
        after: dict[int, list] = {}  # binding position → bindings to put after it
        for i, chunks in plans.items():
            var = bindings[i].var
            sums = []
            for k, pos in enumerate(chunks):
                g_d = bindings[pos].var
                kernel, out_ty = make_kernel(channel_sums_te, [g_d])
                gv = bb.add_func(kernel, "qconv_bias_grad_rows")
                out = var if len(chunks) == 1 else relax.DataflowVar(f"{var.name}_{k}", out_ty)
                after.setdefault(pos, []).append(relax.VarBinding(out, relax.call_tir(gv, [g_d], out_ty)))
                sums.append(out)
            if len(chunks) > 1:
                after[max(chunks)].append(relax.VarBinding(var, R.concat(sums, axis=0)))
        new_bindings = []
        for i, b in enumerate(bindings):
            if i not in plans:
                new_bindings.append(b)
            new_bindings += after.get(i, [])
        return with_bindings(bb.get(), func, self.func, new_bindings)

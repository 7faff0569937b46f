"""BandFrozenChains: run a frozen chain of int8 convolutions a band of output rows at a
time, so the chain's wide middle tensors never exist whole (MCUNetV2's patch-based
inference, in rows).

A chain is a run of quantized convs (any kernel, stride, groups) where each
intermediate output has no reader but the next conv. Output rows ``[r0, r1)`` of
the last conv need a computable range of rows of each earlier tensor (its
receptive field), so the chain is run once per band on a slice of its input,
each conv with its vertical padding cut to what the band touches, and each band's
rows are written into the output in place. Every output value is computed by the
same integer arithmetic as before, so the result is bit-identical; the cost is
the recomputed halo rows. Unlike channel chunking (``ChunkBottlenecks``) nothing
is accumulated across bands, so it needs no int32 accumulator tensor for an int8
projection.

MobileNetV2-w0.35 at 128²: its first six convs (stem → depthwise → projection →
expansion to 48 channels at 64×64 → strided depthwise → projection) peak at
240 KB whole (the 48×64×64 expansion and its depthwise output); in bands of four
output rows the chain needs its input, its 8 KB output and ~20 KB of band
tensors.

Before (three convs, the middle tensors 192 KB and 48 KB)::

    e = R.call_tir_with_grad(qconv, (x, w1, b1, m1, s1), R.Tensor((1, 48, 64, 64), "int8"), ...)
    d = R.call_tir_with_grad(qconv, (e, w2, b2, m2, s2), R.Tensor((1, 48, 32, 32), "int8"), ...)  # 3×3 s2
    y = R.call_tir_with_grad(qconv, (d, w3, b3, m3, s3), R.Tensor((1, 8, 32, 32), "int8"), ...)

After (bands of 4 output rows; band 1 needs input rows 7..16 for its 3×3 s2 conv)::

    x0 = R.strided_slice(x, axes=[2], begin=[0], end=[8])
    e0 = R.call_tir_with_grad(qconv, (x0, w1, ...), R.Tensor((1, 48, 8, 64), "int8"), ...)
    d0 = R.call_tir_with_grad(qconv_pad_top, (e0, w2, ...), R.Tensor((1, 48, 4, 32), "int8"), ...)
    y0 = R.call_tir_with_grad(qconv, (d0, w3, ...), R.Tensor((1, 8, 4, 32), "int8"), ...)
    y = R.call_tir_with_grad(place_rows, (y0,), R.Tensor((1, 8, 32, 32), "int8"),
                             te_grad_name="tinytrain_frozen")
    x1 = R.strided_slice(x, axes=[2], begin=[7], end=[16])
    ...
    y = R.call_tir_inplace(write_rows, (y, y1), [0], R.Tensor((1, 8, 32, 32), "int8"))

Only chains that no gradient reaches (their input depends on no learning
parameter and their weights are frozen) are banded: the row writes have no
gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm
import tvm_ffi
from tvm import relax, te, tirx
from tvm.relax import op as R
from tvm.script import tirx as T  # noqa: F401  (the namespace the TVMScript below uses)

from . import int8_ops
from .exprs import learning_reach, tensor_bytes, use_counts
from .int8_grads import GRAD_PREFIX


@dataclass(frozen=True)
class _Conv:
    var: relax.Var  # the conv's output
    call: relax.Call
    q: int8_ops.QConvParams

    @property
    def args(self):
        return list(self.call.args[1])

    @property
    def kernel_rows(self) -> int:
        return int(self.args[1].ty.shape[2])

    def input_rows(self, r0: int, r1: int, height: int) -> tuple[int, int, int, int]:
        """Input rows ``[a, e)`` that output rows ``[r0, r1)`` read, and the zero rows
        (top, bottom) the band's conv pads with in place of rows outside the image."""
        stride, top = self.q.strides[0], self.q.padding[0]
        a = r0 * stride - top
        e = (r1 - 1) * stride - top + self.kernel_rows
        return max(a, 0), min(e, height), max(-a, 0), max(e - height, 0)


def _band_plan(chain: list[_Conv], rows: int) -> list[list[tuple[int, int, int, int, int]]]:
    """For each band of ``rows`` output rows: per conv (first to last) the input rows
    ``[a, e)`` it reads, the band's (top, bottom) padding and how many rows it makes."""
    out_h = int(chain[-1].var.ty.shape[2])
    plan = []
    for r0 in range(0, out_h, rows):
        r1 = min(r0 + rows, out_h)
        per_conv = []
        for conv in reversed(chain):
            a, e, top, bottom = conv.input_rows(r0, r1, int(conv.args[0].ty.shape[2]))
            per_conv.append((a, e, top, bottom, r1 - r0))
            r0, r1 = a, e
        plan.append(per_conv[::-1])
    return plan


def _band_bytes(chain: list[_Conv], per_conv) -> int:
    """The largest (input band + output band) of one band's convs."""
    worst = 0
    for conv, (a, e, _, _, made) in zip(chain, per_conv):
        in_ty, out_ty = conv.args[0].ty, conv.var.ty
        row_in = tensor_bytes(in_ty) // int(in_ty.shape[2])
        row_out = tensor_bytes(out_ty) // int(out_ty.shape[2])
        worst = max(worst, (e - a) * row_in + made * row_out)
    return worst


def _whole_peak(chain: list[_Conv]) -> int:
    return max(tensor_bytes(c.args[0].ty) + tensor_bytes(c.var.ty) for c in chain)


_WRITE_ROWS = """
@T.prim_func(private=True, s_tir=True)
def write_rows(full: T.Buffer(({n}, {c}, {h}, {w}), "{dt}"), band: T.Buffer(({n}, {c}, {rows}, {w}), "{dt}")):
    T.func_attr({{"tirx.noalias": True}})
    for n, c, y, x in T.grid({n}, {c}, {rows}, {w}):
        with T.sblock("write"):
            vn, vc, vy, vx = T.axis.remap("SSSS", [n, c, y, x])
            T.reads(band[vn, vc, vy, vx])
            T.writes(full[vn, vc, vy + {r0}, vx])
            full[vn, vc, vy + {r0}, vx] = band[vn, vc, vy, vx]
"""


def _write_rows_func(full_ty, band_ty, r0: int):
    """``full[:, :, r0:r0 + rows] = band`` in place (for ``call_tir_inplace``)."""
    n, c, h, w = (int(v) for v in full_ty.shape)
    rows = int(band_ty.shape[2])
    return tvm.script.from_source(_WRITE_ROWS.format(n=n, c=c, h=h, w=w, rows=rows, r0=r0,
                                                     dt=full_ty.dtype))


def _place_rows_te(band, height: int, r0: int, fill: int):
    """The output's first band: ``band`` at rows ``[r0, r0 + rows)``, ``fill`` elsewhere
    (every later band overwrites its rows)."""
    n, c, rows, w = (int(d) for d in band.shape)

    def value(nn, cc, yy, xx):
        inside = tirx.all(yy >= r0, yy < r0 + rows)
        row = tirx.max(tirx.min(yy - r0, rows - 1), 0)
        return tirx.Select(inside, band[nn, cc, row, xx], tirx.const(fill, band.dtype))

    return te.compute((n, c, height, w), value, name="y")


def _frozen_grad(orig_var, call, output_grad, ctx):
    """Banded chains are frozen: nothing upstream needs a gradient."""
    return ctx.emit(relax.Tuple([R.grad.no_grad(a) for a in call.args[1]]))


tvm_ffi.register_global_func(GRAD_PREFIX + "tinytrain_frozen", _frozen_grad, override=True)


def _chains(func: relax.Function, frozen: set) -> list[list[_Conv]]:
    """Maximal runs of frozen quantized convs, each intermediate read only by the next."""
    bindings = list(func.body.blocks[0].bindings)
    uses = use_counts(func)
    learning = learning_reach(func, frozen)
    open_chain: dict[relax.Var, list[_Conv]] = {}  # last output → its chain
    chains = []
    for b in bindings:
        if int8_ops.qop_name(b.value) != "tinytrain_qconv" or b.var in learning:
            continue
        args = list(b.value.args[1])
        if not all(isinstance(a, tvm.ir.expr.Constant) or a in frozen for a in args[1:]):
            continue
        conv = _Conv(b.var, b.value, int8_ops.qconv_params(b.value))
        x = args[0]
        chain = open_chain.pop(x, None) if uses.get(x) == 1 else None
        if chain is None:
            chain = []
            chains.append(chain)
        chain.append(conv)
        open_chain[b.var] = chain
    return chains


def _peak_outside(func: relax.Function, skip: set) -> int:
    """The largest (output + its largest input) of the bindings not in ``skip``: a bound
    below which banding a chain saves nothing."""
    peak = 0
    activations = {func.params[0]} | {b.var for b in func.body.blocks[0].bindings}
    for b in func.body.blocks[0].bindings:
        inputs = [tensor_bytes(v.ty) for v in relax.analysis.free_vars(b.value) if v in activations]
        if b.var in skip or not inputs:  # parameters only (a weight's transpose): no activation
            continue
        peak = max(peak, tensor_bytes(b.var.ty) + max(inputs))
    return peak


MAX_RUN = 8  # convs per banded run at most (the halo, recomputed per band, grows with it)


@tvm.transform.module_pass(opt_level=0, name="BandFrozenChains")
class BandFrozenChains:
    def __init__(self, frozen: set[str], target_bytes: int = 16 * 1024, func: str = "main"):
        self.frozen_names, self.target, self.func = set(frozen), target_bytes, func

    def _peak(self, chain: list[_Conv]) -> tuple[int, int | None]:
        """(peak bytes, band rows) of running ``chain`` in the tallest bands whose tensors
        fit ``target``; (peak, None) run whole, where banding would not lower it."""
        whole = _whole_peak(chain)
        if whole <= self.target:
            return whole, None

        def band(rows: int) -> int:
            return max(_band_bytes(chain, per_conv) for per_conv in _band_plan(chain, rows))

        lo, hi = 1, int(chain[-1].var.ty.shape[2]) - 1  # a band's bytes grow with its rows
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if band(mid) <= self.target else (lo, mid - 1)
        banded = tensor_bytes(chain[0].args[0].ty) + tensor_bytes(chain[-1].var.ty) + band(lo)
        return (banded, lo) if banded < whole else (whole, None)

    def _runs(self, chain: list[_Conv], floor: int) -> list[tuple[list[_Conv], int | None]]:
        """``chain`` cut into runs, each banded or whole, so the highest run peak is lowest
        (then the fewest runs): a long chain's receptive field spans the whole image, so it
        is banded a few convs at a time."""
        # per end j: (peak, banded runs, runs, start of the last run, its rows); peaks under
        # ``floor`` (what the rest of the step needs anyway) do not count: no banding for them
        best = [(0, 0, 0, 0, None)]
        for j in range(1, len(chain) + 1):
            options = []
            for i in range(max(0, j - MAX_RUN), j):
                peak, rows = self._peak(chain[i:j])
                options.append((max(best[i][0], peak, floor), best[i][1] + (rows is not None),
                                best[i][2] + 1, i, rows))
            best.append(min(options))
        runs, j = [], len(chain)
        while j > 0:
            *_, i, rows = best[j]
            runs.append((chain[i:j], rows))
            j = i
        return runs[::-1]

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        f = mod[self.func]
        if len(f.body.blocks) != 1:
            return mod
        frozen = {p for p in f.params if p.name in self.frozen_names}
        banded = {}
        chains = _chains(f, frozen)
        in_chains = {c.var for chain in chains for c in chain}
        floor = _peak_outside(f, in_chains)
        for chain in chains:
            for run, rows in self._runs(chain, floor):
                if rows is not None:
                    banded[run[-1].var] = (run, rows)
        if not banded:
            return mod
        skip = {c.var for chain, _ in banded.values() for c in chain}
        bb = relax.BlockBuilder(mod)  # new kernels get names the module does not use yet
        temp = self.func + "__banded"
        with bb.function(temp, list(f.params)):
            with bb.dataflow():
                for b in f.body.blocks[0].bindings:
                    if b.var in banded:
                        self._emit_bands(bb, *banded[b.var], b.var)
                    elif b.var not in skip:
                        bb.emit_normalized(b)
                out = f.body.body
            bb.emit_func_output(out)
        built = bb.get()
        result = tvm.IRModule({gv: fn for gv, fn in built.functions.items() if gv.name_hint != temp})
        new = built[temp]
        result[self.func] = relax.Function(new.params, new.body, new.ret_ty, new.is_pure, f.attrs)
        return result

    def _emit_bands(self, bb, chain: list[_Conv], rows: int, out_var) -> None:
        x = chain[0].args[0]
        height = int(x.ty.shape[2])
        out_ty = chain[-1].var.ty
        full = None
        r0 = 0
        for per_conv in _band_plan(chain, rows):
            a, e = per_conv[0][:2]
            v = x if (a, e) == (0, height) else bb.emit(R.strided_slice(x, axes=[2], begin=[a], end=[e]))
            for conv, (_, _, top, bottom, _) in zip(chain, per_conv):
                p = conv.q.padding
                q = replace(conv.q, padding=(top, p[1], bottom, p[3]))
                _, w, b, mult, shift = conv.args
                v = int8_ops.emit_qconv(bb, v, w, b, q, [mult, shift])
            if full is None:
                func, ty = int8_ops.make_kernel(
                    lambda t, r0=r0: _place_rows_te(t, int(out_ty.shape[2]), r0, chain[-1].q.zy), [v])
                gv = bb.add_func(func, "place_rows")
                full = bb.emit(relax.call_tir_with_grad(gv, [v], ty, "tinytrain_frozen", {}))
            else:
                gv = bb.add_func(_write_rows_func(out_ty, v.ty, r0), "write_rows")
                full = bb.emit(R.call_tir_inplace(gv, (full, v), [0], out_ty))
            r0 += int(v.ty.shape[2])
        bb.emit_normalized(relax.VarBinding(out_var, full))
